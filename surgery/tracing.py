"""Trace any ``nn.Module`` into a ``torch.fx.GraphModule`` that keeps module-path names.

>>> import torchvision, surgery
>>> gm = surgery.trace(torchvision.models.resnet18())
>>> [n.target for n in gm.graph.nodes if n.op == "call_module"][:3]
['conv1', 'bn1', 'relu']

Tracing runs with the model in eval mode: Python control flow on ``self.training``
(GoogLeNet's auxiliary heads, say) is frozen as at inference. Leaf modules keep
switching with ``.train()``/``.eval()`` at run time: every ``torch.nn`` layer, any
module whose class sets ``surgery_leaf = True``, and torchvision's ``StochasticDepth``.
"""
from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from surgery.errors import SurgeryError
from surgery._util import evaluating, first_line
from surgery.recipe import attach_recipe, recipe_of

LeafSpec = str | type


def _default_leaf_types() -> tuple[type, ...]:
    from torchvision.ops import StochasticDepth

    return (StochasticDepth,)


class ScopedTracer(fx.Tracer):
    """An fx tracer with extra leaf modules (by path or class) that remembers where tracing failed."""

    def __init__(self, leaf_modules: Sequence[LeafSpec] = ()):
        super().__init__()
        self.leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type)) + _default_leaf_types()
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or isinstance(m, self.leaf_types) or getattr(m, "surgery_leaf", False):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def _user_frame(tb: Any) -> str:
    """``file:line`` of the innermost frame outside torch itself (the model's own code)."""
    torch_dir = os.path.dirname(torch.__file__)
    where = ""
    for frame in traceback.extract_tb(tb):
        if not frame.filename.startswith(torch_dir):
            where = f"{os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"
    return where


def trace_graph(
    model: nn.Module,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.Graph:
    """The fx graph of ``model`` (its nodes carry ``meta['nn_module_stack']``).

    A ``GraphModule`` is not re-traced: its graph (and node metadata) is used as is.
    Raises :class:`SurgeryError` naming the operation and module that fx cannot trace.
    """
    if isinstance(model, fx.GraphModule) and not leaf_modules and not concrete_args:
        return model.graph
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected an nn.Module, got {type(model).__name__}")
    tracer = ScopedTracer(leaf_modules)
    try:
        with evaluating(model, grad=True):
            return tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001 - fx raises anything the model's code raises
        what = first_line(e)
        where = _user_frame(e.__traceback__)
        if tracer.failed_in is not None and tracer.failed_in[0]:
            path, cls = tracer.failed_in
            fix = f"mark '{path}' ({cls}) as a leaf: leaf_modules=['{path}'] (CLI --leaf {path})"
        else:
            fix = "fix the argument it depends on with concrete_args={...}"
        raise SurgeryError(
            f"cannot trace {type(model).__name__}: {what}" + (f" at {where}" if where else "") + f"; {fix}"
        ) from None


def trace(
    model: nn.Module,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule whose submodules keep their module paths.

    The GraphModule shares parameters with ``model`` and carries its recipe.

    Args:
        model: any ``nn.Module`` fx can trace.
        leaf_modules: module paths (``"layer2.0"``) or classes to keep as single
            calls instead of tracing through them (use it for untraceable blocks).
        concrete_args: fixed values for forward arguments (e.g. flags driving ``if``s).

    Example:
        >>> import torchvision, surgery
        >>> gm = surgery.trace(torchvision.models.resnet18(), leaf_modules=["layer1"])
        >>> "layer1" in [n.target for n in gm.graph.nodes]
        True
    """
    graph = trace_graph(model, leaf_modules, concrete_args)
    if isinstance(model, fx.GraphModule) and graph is model.graph:
        graph = _copy_graph(graph)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(model.training)
    return attach_recipe(gm, recipe_of(model))


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new
