"""Capture any ``nn.Module`` as a graph to cut, choosing the front-end: torch.fx, fx with leaves, torch.export.

``tracer="auto"`` (the default everywhere) tries, in order:

1. torch.fx with the project's tracer;
2. torch.fx again with each module whose code fx cannot trace made a leaf (repeated
   until it traces; cuts cannot go inside those modules, and :attr:`Capture.leaves`
   lists them);
3. ``torch.export`` (non-strict) on an example input, with dynamic shapes, when the
   model's own ``forward`` cannot be traced (Hugging Face transformers, say).

``tracer="fx"`` or ``"export"`` forces one. **Naming rule**: a cut name is a module path
(``layer2``, ``model.layers.2``, ``blocks``), which means the same point whichever
front-end captured the graph, or a node name, which is specific to the front-end
(``cut_points`` lists both).

>>> import torch, torchvision
>>> cap = capture(torchvision.models.resnet18())
>>> cap.tracer, cap.leaves
('fx', ())
>>> gm = trace(torchvision.models.resnet18(), leaf_modules=["layer1"])
>>> "layer1" in [n.target for n in gm.graph.nodes]
True
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, Literal

from torch import fx, nn

from surgery.core.errors import SurgeryError
from surgery.core.recipe import attach_recipe, recipe_of
from surgery.graph.fx import LeafSpec, fx_graph
from surgery.graph.inputs import Example, default_example
from surgery.graph.torch_export import export_graph

Tracer = Literal["auto", "fx", "export"]
TRACERS: tuple[str, ...] = ("auto", "fx", "export")


@dataclasses.dataclass
class Capture:
    """A captured graph: ``root`` owns the attributes its nodes read (the model itself under fx).

    >>> import torchvision, surgery
    >>> c = surgery.capture(torchvision.models.resnet18())
    >>> c.tracer, c.leaves, len(list(c.graph.nodes)) > 50
    ('fx', (), True)
    """

    root: nn.Module
    graph: fx.Graph
    tracer: str  # "fx", "export", or "graph" for a GraphModule used as it is
    leaves: tuple[str, ...] = ()  # modules made leaves automatically
    notes: tuple[str, ...] = ()
    example: Example | None = None  # the input export ran on (a batch of 1 made 2; None under fx)

    def graph_module(self, class_name: str = "GraphModule") -> fx.GraphModule:
        """A GraphModule of a copy of the graph (the calling convention kept) over ``root``."""
        return fx.GraphModule(self.root, copy_graph(self.graph), class_name=class_name)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` with its node metadata and calling convention (pytree in/out specs)."""
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def capture(
    model: nn.Module,
    example_input: Any = None,
    *,
    tracer: str = "auto",
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    quiet: bool = False,
    dynamic: bool = True,
) -> Capture:
    """Capture ``model``'s graph with the front-end ``tracer`` chooses (see the module doc).

    Args:
        model: any ``nn.Module``; a ``GraphModule`` is used as it is.
        example_input: a tensor, tuple (positional), dict (keyword inputs) or
            :class:`~surgery.graph.inputs.Example`; torch.export needs one (default: a guess
            from the model, see :func:`~surgery.graph.inputs.default_example`).
        tracer: ``"auto"``, ``"fx"`` or ``"export"``.
        leaf_modules, concrete_args: for fx (module paths or classes kept as one call).
        quiet: do not warn about automatic leaves and notes (they are in the result).
        dynamic: torch.export leaves dimensions free (default) or fixes them at the example's sizes.

    Raises a one-line :class:`SurgeryError` when no front-end captures the model.

    >>> import torch, torchvision, surgery
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> c = surgery.capture(net, torch.randn(2, 3, 32, 32), tracer="export")
    >>> x = torch.randn(2, 3, 32, 32)
    >>> c.tracer, torch.equal(c.graph_module()(x), net(x))
    ('export', True)
    """
    if tracer not in TRACERS:
        raise SurgeryError(f"unknown tracer '{tracer}'; choose one of {', '.join(TRACERS)}")
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule) and not leaf_modules and not concrete_args:
        return Capture(model, model.graph, "graph")
    result = _capture(model, Example.of(example_input), tracer, leaf_modules, concrete_args, dynamic)
    if not quiet:
        for message in result.notes:
            warnings.warn(message, stacklevel=3)
    return result


def _capture(
    model: nn.Module,
    example: Example | None,
    tracer: str,
    leaf_modules: Sequence[LeafSpec],
    concrete_args: dict[str, Any] | None,
    dynamic: bool = True,
) -> Capture:
    fx_error: SurgeryError | None = None
    if tracer in ("auto", "fx"):
        try:
            graph, leaves = fx_graph(model, leaf_modules, concrete_args, auto_leaves=tracer == "auto")
        except SurgeryError as e:
            if tracer == "fx":
                raise
            fx_error = e
        else:
            notes = (
                (f"{type(model).__name__}: fx could not trace inside {', '.join(leaves)}; kept as leaves",)
                if leaves
                else ()
            )
            return Capture(model, graph, "fx", tuple(leaves), notes)
    example = example if example is not None else default_example(model)
    try:
        gm, export_notes, example = export_graph(model, example, dynamic)
    except SurgeryError as e:
        if fx_error is None:
            raise
        raise SurgeryError(f"{fx_error}; {e}") from None
    return Capture(gm, gm.graph, "export", (), tuple(export_notes), example)


def trace(
    model: nn.Module,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    *,
    example_input: Any = None,
    tracer: str = "auto",
) -> fx.GraphModule:
    """``model`` as a GraphModule whose submodules keep their module paths (see :func:`capture`).

    The GraphModule shares parameters and modules with ``model`` (its own module tree is
    put back over the graph), follows its train/eval mode, and carries its recipe.

    Args:
        model: any ``nn.Module``.
        leaf_modules: module paths (``"layer2.0"``) or classes to keep as single calls.
        concrete_args: fixed values for forward arguments (fx).
        example_input, tracer: see :func:`capture`.

    >>> import torch, torchvision, surgery
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> gm = surgery.trace(net)
    >>> x = torch.randn(2, 3, 32, 32)
    >>> isinstance(gm, torch.fx.GraphModule), torch.equal(gm(x), net(x))
    (True, True)
    """
    cap = capture(model, example_input, tracer=tracer, leaf_modules=leaf_modules, concrete_args=concrete_args)
    gm = cap.graph_module(type(model).__name__)
    _own_tree(gm, model)
    gm.train(model.training)
    return attach_recipe(gm, recipe_of(model))


def _own_tree(gm: fx.GraphModule, model: nn.Module) -> None:
    """Put ``model``'s own top-level children back over ``gm`` (they hold the very parameters its nodes read).

    torch.export rebuilds the module tree as plain containers of parameters; with the
    model's own modules back, each parameter's owner is a Linear, LayerNorm, Embedding...
    again, which is what the channel analysis and the weight edits look at.
    """
    for name, child in model.named_children():
        setattr(gm, name, child)


def traced_copy(model: nn.Module, example_input: Any = None, *, tracer: str = "auto") -> fx.GraphModule:
    """A GraphModule of a deep copy of ``model`` that keeps the model's own module tree.

    ``trace`` rebuilds containers as plain modules and drops modules the graph never
    calls; here the copy's top-level children are put back, so ``result.layer2[0]``
    indexes a Sequential as before and unused heads keep their weights.
    """
    twin = copy.deepcopy(model)
    cap = capture(twin, example_input, tracer=tracer, quiet=True)
    gm = cap.graph_module(type(model).__name__)
    gm.train(model.training)
    _own_tree(gm, twin)
    return attach_recipe(gm, recipe_of(model))
