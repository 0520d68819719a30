"""The torch.fx front-end: trace an ``nn.Module`` into a graph that keeps module-path names.

>>> import torchvision
>>> graph, auto = fx_graph(torchvision.models.resnet18())
>>> [n.target for n in graph.nodes if n.op == "call_module"][:3], auto
(['conv1', 'bn1', 'relu'], [])

Tracing runs with the model in eval mode: Python control flow on ``self.training``
(GoogLeNet's auxiliary heads, say) is frozen as at inference. Leaf modules keep
switching with ``.train()``/``.eval()`` at run time: every ``torch.nn`` layer, any
module whose class sets ``surgery_leaf = True``, and torchvision's ``StochasticDepth``.

Modules fx cannot trace become leaves automatically (:func:`fx_graph`);
:mod:`surgery.graph.capture` falls back to torch.export when the model's own ``forward`` is
the problem.
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from surgery.core.errors import SurgeryError
from surgery.core.util import evaluating, first_line
from surgery.graph.names import mark_returned

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
        if (
            module_qualified_name in self.leaf_paths
            or isinstance(m, self.leaf_types)
            or getattr(m, "surgery_leaf", False)
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise
        mark_returned(out, self.path_of_module(m))
        return out


def _user_frame(tb: Any) -> str:
    """``file:line`` of the innermost frame outside torch itself (the model's own code)."""
    torch_dir = os.path.dirname(torch.__file__)
    where = ""
    for frame in traceback.extract_tb(tb):
        if not frame.filename.startswith(torch_dir):
            where = f"{os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"
    return where


MAX_AUTO_LEAVES = 64


def _fail(model: nn.Module, error: Exception, failed_in: tuple[str, str] | None) -> SurgeryError:
    where = _user_frame(error.__traceback__)
    if failed_in is not None and failed_in[0]:
        path, cls = failed_in
        fix = f"mark '{path}' ({cls}) as a leaf: leaf_modules=['{path}'] (CLI --leaf {path})"
    else:
        fix = "fix the argument it depends on with concrete_args={...}"
    return SurgeryError(
        f"cannot trace {type(model).__name__}: {first_line(error)}" + (f" at {where}" if where else "") + f"; {fix}"
    )


def fx_graph(
    model: nn.Module,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    *,
    auto_leaves: bool = True,
) -> tuple[fx.Graph, list[str]]:
    """The fx graph of ``model`` (nodes carry ``meta['nn_module_stack']``) and the modules made leaves on the way.

    With ``auto_leaves``, a module whose code fx cannot trace becomes a leaf (one call in
    the graph) and tracing starts again, until it traces or the failure is in the
    model's own ``forward``; when a second module of the same class fails, every
    module of that class becomes a leaf at once. Raises :class:`SurgeryError` naming the
    operation and module that fx cannot trace.
    """
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"expected an nn.Module, got {type(model).__name__}")
    leaves: list[LeafSpec] = list(leaf_modules)
    concrete_args = {**optional_defaults(model), **(concrete_args or {})} or None
    added: list[str] = []
    failed_classes: set[type] = set()
    while True:
        tracer = ScopedTracer(leaves)
        try:
            with evaluating(model, grad=True):
                return tracer.trace(model, concrete_args=concrete_args), added
        except Exception as e:  # noqa: BLE001 - fx raises anything the model's code raises
            path = tracer.failed_in[0] if tracer.failed_in else ""
            if not auto_leaves or not path or path in leaves or len(added) >= MAX_AUTO_LEAVES:
                raise _fail(model, e, tracer.failed_in) from None
            cls = type(model.get_submodule(path))
            new = [path]
            if cls in failed_classes:
                new = [p for p, m in model.named_modules() if type(m) is cls and p and p not in leaves]
            failed_classes.add(cls)
            leaves += new
            added += new


_CONSTANT_TYPES = (type(None), bool, int, float, str)


def optional_defaults(model: nn.Module) -> dict[str, Any]:
    """The optional arguments of ``model.forward`` whose default is a constant (None, a bool, a number, a string).

    fx traces them at their default, as the model runs when called without them: traced as
    inputs instead, ``if mask is not None:`` would take the branch of a given mask (an
    optional argument captured as given, then used as None). fx guards each fixed value.

    >>> import timm
    >>> optional_defaults(timm.create_model("hiera_tiny_224", embed_dim=8, stages=(1, 1, 1, 1), img_size=64))
    {'mask': None}
    """
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and type(p.default) in _CONSTANT_TYPES
    }


def trace_graph(
    model: nn.Module,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.Graph:
    """The fx graph of ``model`` with exactly the given leaves (no automatic ones); see :func:`fx_graph`.

    A ``GraphModule`` is not re-traced: its graph (and node metadata) is used as is.
    """
    if isinstance(model, fx.GraphModule) and not leaf_modules and not concrete_args:
        return model.graph
    return fx_graph(model, leaf_modules, concrete_args, auto_leaves=False)[0]
