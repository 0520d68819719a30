"""What crosses a cut: the values still used after it, less those a later piece can have without them.

Every value computed before a cut and used after it is live there
(:meth:`surgery.graph.names.GraphIndex.live_after`). Of those, two kinds stay inside the pieces
instead of crossing, so that pieces hand over tensors (and only the sizes no crossing
tensor holds):

* **constants**, the same for every input: an fx placeholder whose default is ``None``,
  a bool, a number or a string that the model is called without (timm's
  ``attn_mask=None``, ``is_causal=False``), or a node whose recorded value (torch.export's
  ``meta['val']``) is a plain Python scalar. Later pieces use the literal; the first piece
  refuses, in one line, another value for such an input (the later pieces could not see it).
* **sizes** that vary with the input (torch.export's ``SymInt`` values: the batch size, a
  sequence length) equal to a dimension of a tensor that crosses anyway: the later piece
  reads it from that tensor's shape (``aten.sym_size.int``), as the model did.

The values that cross come in the order :func:`boundary` is given first (the value, or
the values, the named module returned), then in graph order.

>>> import transformers
>>> from surgery.graph.capture import capture
>>> from surgery.graph.names import GraphIndex
>>> config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
...                                  num_attention_heads=2, intermediate_size=64)
>>> index = GraphIndex(capture(transformers.BertModel(config)).graph)
>>> b = boundary(index, index.resolve("encoder.layer.0"), [index.node("encoder.layer.0")])
>>> [v.name for v in b.values], [(t.name, dim) for t, dim in b.sizes.values()]
(['layer_norm_2', 'expand_2'], [('layer_norm_2', 0), ('layer_norm_2', 1)])

The layer's output and the attention mask cross; the batch size and the length, which
the layer's next piece reads again, come from the output's shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from surgery.core.errors import SurgeryError
from surgery.core.util import evaluating
from surgery.graph.inputs import Example
from surgery.graph.names import GraphIndex

CONSTANT_TYPES = (type(None), bool, int, float, str)
_MISSING = object()


@dataclasses.dataclass
class Boundary:
    """One cut: the values that cross it (in order), and the live values that do not.

    ``constants`` maps a node to the literal later pieces use for it; ``sizes`` maps a
    size node to ``(tensor, dim)``: a crossing tensor and the dimension that holds it.
    """

    values: list[fx.Node]
    constants: dict[fx.Node, Any]
    sizes: dict[fx.Node, tuple[fx.Node, int]]


def constant_value(node: fx.Node) -> Any:
    """The value ``node`` has for every input, or ``_MISSING`` when it varies (or is not known)."""
    if node.op == "placeholder":
        default = node.args[0] if node.args else _MISSING
        return default if isinstance(default, CONSTANT_TYPES) else _MISSING
    if "val" in node.meta and isinstance(node.meta["val"], CONSTANT_TYPES):
        return node.meta["val"]
    return _MISSING


def _size_source(node: fx.Node, tensors: Sequence[fx.Node]) -> tuple[fx.Node, int] | None:
    """A crossing tensor and the dimension whose (symbolic) size is ``node``'s value, if any."""
    val = node.meta.get("val")
    if not isinstance(val, torch.SymInt):
        return None
    expr = val.node.expr
    for t in tensors:
        shape = getattr(t.meta.get("val"), "shape", ())
        for d, size in enumerate(shape):
            if isinstance(size, torch.SymInt) and size.node.expr == expr:
                return t, d
    return None


def boundary(index: GraphIndex, p: int, first: Sequence[fx.Node] = ()) -> Boundary:
    """The boundary right after position ``p``; ``first`` (those of them live there) lead, in their order."""
    live = index.live_after(p)
    leading = [n for n in first if n in live]
    live = [*leading, *(n for n in live if n not in leading)]
    constants = {n: v for n in live if (v := constant_value(n)) is not _MISSING}
    rest = [n for n in live if n not in constants]
    tensors = [n for n in rest if isinstance(n.meta.get("val"), torch.Tensor)]
    sizes = {n: src for n in rest if (src := _size_source(n, tensors)) is not None}
    values = [n for n in rest if n not in sizes]
    if not values:  # nothing else crosses: the piece hands over what there is
        return Boundary(live, {}, {})
    return Boundary(values, constants, sizes)


def module_outputs(index: GraphIndex, name: str) -> list[fx.Node]:
    """The values computed in the (single) call of module ``name`` and used after it, in graph order."""
    calls = index.module_calls.get(name, [])
    if len(calls) != 1:
        return []
    inside = set(calls[0])
    pos = index.position
    return [index.nodes[i] for i in sorted(inside) if any(pos[u] not in inside for u in index.nodes[i].users)]


def _kind(node: fx.Node) -> tuple[Any, ...] | None:
    """A value's dtype and per-sample shape as recorded (sizes that vary as None); None when not a tensor."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return (val.dtype, *(d if isinstance(d, int) else None for d in val.shape[1:]))


def _matches(node: fx.Node, value: torch.Tensor) -> bool:
    """Whether ``value`` could be ``node``'s: same dtype and per-sample shape as its recorded value."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype != value.dtype or val.dim() != value.dim():
        return False
    return all(not isinstance(a, int) or a == b for a, b in zip(val.shape[1:], value.shape[1:]))


def returned_order(model: nn.Module, example: Example | None, index: GraphIndex, name: str) -> list[fx.Node]:
    """The values module ``name`` returned, in its order ([] when unknown).

    fx records them while tracing (:func:`surgery.graph.names.mark_returned`); for a torch.export
    graph, when the call leaves more than one value behind, one run of ``example`` with a
    hook on the module tells its order, each returned tensor matched to the only value of
    its dtype and shape.
    """
    recorded = index.returned(name)
    outs = module_outputs(index, name)
    if recorded or len(outs) < 2 or example is None or len(set(map(_kind, outs))) < len(outs):
        return recorded  # known, only one value, or values a run could not tell apart
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return []
    got: list[Any] = []
    hook = module.register_forward_hook(lambda m, args, out: got.append(out))
    try:
        with evaluating(model):
            example(model)
    finally:
        hook.remove()
    leaves = [t for t in pytree.tree_leaves(got[0]) if isinstance(t, torch.Tensor)] if len(got) == 1 else []
    order = [[n for n in outs if _matches(n, t)] for t in leaves]
    return [m[0] for m in order] if order and all(len(m) == 1 for m in order) else []


def at_default(value: Any, default: Any, name: str) -> None:
    """Refuse another value than ``default`` for input ``name``: the pieces after the cut use it as that constant."""
    if value is not default and not (type(value) is type(default) and value == default):
        raise SurgeryError(
            f"these pieces take '{name}' only at its default ({default!r}): the pieces after the first use it "
            "as that constant; call the model itself for another value"
        )


def receive(g: fx.Graph, cut: Boundary) -> dict[fx.Node, Any]:
    """The start of the piece after ``cut``: a placeholder per crossing value, then its constants and sizes."""
    env: dict[fx.Node, Any] = {}
    for v in cut.values:
        env[v] = g.placeholder(v.name)
        env[v].meta.update({key: v.meta[key] for key in ("val", "tensor_meta") if key in v.meta})
    env.update(cut.constants)
    for v, (tensor, dim) in cut.sizes.items():
        env[v] = g.call_function(torch.ops.aten.sym_size.int, (env[tensor], dim), name=v.name)
        env[v].meta["val"] = v.meta["val"]
    return env


def guard_defaults(g: fx.Graph, fixed: dict[fx.Node, Any]) -> None:
    """In the first piece, refuse another value than the default for each input a later piece uses as a constant."""
    body = next((n for n in g.nodes if n.op != "placeholder"), None)
    for placeholder, value in fixed.items():
        with g.inserting_before(body):
            g.call_function(at_default, (placeholder, value, str(placeholder.target)))
