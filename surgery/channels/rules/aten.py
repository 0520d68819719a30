"""Channel rules for the aten ops of graphs captured by torch.export (Hugging Face transformers, say).

torch.export records aten operators (``aten.linear``, ``aten.view``, ...) where torch.fx
records torch functions and tensor methods. Most take their arguments in the same
order as their counterparts and share their rules (each rule is registered for all the
forms :mod:`surgery.graph.ops` lists for its op); the rest have their own here:
embeddings (a table whose columns are the channels), ``addmm`` of Hugging Face's
``Conv1D`` (GPT-2's layers, weight stored input-major), scaled dot-product attention
(queries and keys are compared over their channels, values pass theirs to the output),
and the aten forms of slicing, selecting and expanding. The weight edits of
``nn.Embedding`` and ``Conv1D`` are registered here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgery.channels.edits import ChannelMap, read_columns, set_tensor, take
from surgery.channels.groups import Endpoint, Layout, Segment
from surgery.channels.registry import _FUNCTION_RULES, _LITERAL_EDITS, _MODULE_RULES, _register, register_edit
from surgery.channels.rules.arguments import _arg, _node, _norm, _parameter_owner, _shape_of
from surgery.channels.walk import _fallback, _Walk

aten = torch.ops.aten
ATEN = ("aten",)


@_register(_FUNCTION_RULES, [aten.sym_size.int, aten._assert_tensor_metadata.default])
def _reads_metadata(w: _Walk, node: fx.Node) -> None:
    """Reading a size or checking a dtype leaves the channels alone."""
    return None


def _table(w: _Walk, node: fx.Node, path: str, channels: int) -> Layout:
    out = Layout(len(w.shape(node) or (0,)) - 1, (Segment(w.new_group(channels), channels),))
    w.add(out, "producers", Endpoint(node.name, path, "Embedding", node.name))
    return out


@_register(_FUNCTION_RULES, [aten.embedding.default])
def _embedding(w: _Walk, node: fx.Node) -> Layout | None:
    """``aten.embedding(weight, indices)`` of an Embedding's own table: its columns are new channels."""
    owner = _parameter_owner(w, node.args[0], node)
    if owner is None or not issubclass(owner[1], nn.Embedding) or owner[2] != "weight":
        _fallback(w, node)
        return None
    shape = w.shapes.of.get(node.name, (0,))
    assert shape is not None, "an embedding's output is a tensor"
    return _table(w, node, owner[0], int(shape[-1] or 0))


@_register(_MODULE_RULES, [nn.Embedding])
def _embedding_module(w: _Walk, node: fx.Node, emb: nn.Embedding) -> Layout | None:
    return _table(w, node, str(node.target), emb.embedding_dim)


@_register(_FUNCTION_RULES, [aten.addmm.default])
def _addmm(w: _Walk, node: fx.Node) -> Layout | None:
    """``addmm(bias, x, weight)`` of Hugging Face's ``Conv1D`` (weight ``[in, out]``): reads x's channels, makes new."""
    bias, x, weight = node.args[:3]
    owner = _parameter_owner(w, weight, node)
    if (
        owner is None
        or owner[1].__name__ != "Conv1D"
        or _parameter_owner(w, bias, node) != (owner[0], owner[1], "bias")
    ):
        _fallback(w, node)
        return None
    layout = w.layout(x)
    if layout is not None and layout.dim != 1:
        w.block([layout], f"{w.describe(node)} mixes dim 1 but these channels are on dim {layout.dim}")
        layout = None
    if layout is not None:
        w.add(layout, "consumers", Endpoint(node.name, owner[0], "Conv1D", _node(x).name))
    channels = int(_shape_of(w, node)[1])
    out = Layout(1, (Segment(w.new_group(channels), channels),))
    w.add(out, "producers", Endpoint(node.name, owner[0], "Conv1D", node.name))
    return out


@_register(_FUNCTION_RULES, [aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention])
def _attention(w: _Walk, node: fx.Node) -> Layout | None:
    """Queries and keys are compared over their channels (not followed); values hand theirs to the output."""
    query, key, value = node.args[:3]
    compared = [w.layout(query), w.layout(key)]
    w.block(compared, f"{w.describe(node)} compares queries with keys over these channels")
    layout = w.layout(value)
    if layout is None:
        return None
    if layout.dim != len(w.shape(value) or ()) - 1:
        w.block([layout], f"{w.describe(node)} mixes the values over the dim that carries these channels")
        return None
    return layout


@_register(_FUNCTION_RULES, [aten.slice.Tensor])
def _slice(w: _Walk, node: fx.Node) -> Layout | None:
    """``aten.slice(x, dim, start, end, step)``: the channels it keeps (its bounds are rewritten on widening)."""
    x = node.args[0]
    layout = w.layout(x)
    shape = w.shape(x)
    if layout is None or shape is None:
        return layout
    if _norm(_arg(node, 1, "dim", 0), len(shape)) != layout.dim:
        return layout
    start, end, step = (_arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1))
    if any(b is not None and not isinstance(b, int) for b in (start, end, step)):
        w.block([layout], f"{w.describe(node)} slices these channels at a computed position")
        return None
    first, last, stride = slice(start, end, step).indices(layout.size)
    if (first, last, stride) == (0, layout.size, 1):
        return layout
    out = w.select(layout, first, last, node) if stride == 1 and first < last else None
    if out is None:
        w.block([layout], f"{w.describe(node)} selects some of these channels")
        return None
    w.add(layout, "literals", Endpoint(node.name, node.name, "aten_slice", _node(x).name))
    return out


def _rewrite_aten_slice(node: fx.Node, ep: Endpoint, moved: Callable[[int], int], size: int) -> None:
    start, end = _arg(node, 2, "start"), _arg(node, 3, "end")

    def bound(b: int | None) -> int | None:
        return None if b is None else moved(max(0, b + size) if b < 0 else min(b, size))

    node.args = (node.args[0], node.args[1], bound(start), bound(end), *node.args[4:])


_LITERAL_EDITS.register("aten_slice", _rewrite_aten_slice)


@_register(_FUNCTION_RULES, [aten.select.int])
def _select(w: _Walk, node: fx.Node) -> Layout | None:
    """``aten.select(x, dim, index)``: one position of another dim drops it; one channel cannot be followed."""
    x = node.args[0]
    layout = w.layout(x)
    if layout is None:
        return None
    dim = _norm(cast(int, node.args[1]), len(_shape_of(w, x)))
    if dim == layout.dim:
        w.block([layout], f"{w.describe(node)} selects one of these channels")
        return None
    return layout.at(layout.dim - (1 if dim < layout.dim else 0))


@_register(_FUNCTION_RULES, [aten.expand.default])
def _expand(w: _Walk, node: fx.Node) -> Layout | None:
    """``aten.expand(x, sizes)``: new leading dims shift the channels; their own dim keeps its size."""
    x = node.args[0]
    layout = w.layout(x)
    before, after = w.shape(x), w.shape(node)
    if layout is None or before is None or after is None:
        return layout
    dim = layout.dim + len(after) - len(before)
    if after[dim] != before[layout.dim]:
        w.block([layout], f"{w.describe(node)} broadcasts these channels")
        return None
    return layout.at(dim)


# ----------------------------------------------------------------------------- weight edits


def _embedding_out(emb: nn.Embedding, m: ChannelMap) -> None:
    set_tensor(emb, "weight", take(emb.weight.detach(), 1, m))
    emb.embedding_dim = m.size


def _conv1d_out(layer: Any, m: ChannelMap) -> None:
    """Hugging Face's ``Conv1D`` (weight ``[in, out]``): new output columns and bias entries."""
    set_tensor(layer, "weight", take(layer.weight.detach(), 1, m))
    set_tensor(layer, "bias", take(layer.bias.detach(), 0, m))
    layer.nf = m.size


def _conv1d_in(layer: Any, m: ChannelMap, noise: float, gen: torch.Generator | None) -> None:
    set_tensor(layer, "weight", read_columns(layer.weight.detach().T, m, 1, noise, gen).T.contiguous())


register_edit(nn.Embedding, out=_embedding_out)
register_edit("Conv1D", out=_conv1d_out, inp=_conv1d_in)  # transformers' class, by name (an optional package)
