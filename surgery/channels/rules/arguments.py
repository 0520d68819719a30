"""Reading an fx node's arguments as the channel rules need them: by position or keyword, dims normalised."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from torch import fx, nn

if TYPE_CHECKING:
    from surgery.channels.walk import _Walk


def _node(value: Any) -> fx.Node:
    """``value`` as the graph node it is by construction (an input the walk tracks a layout or shape for)."""
    assert isinstance(value, fx.Node), f"expected a graph node, got {type(value).__name__}"
    return value


def _shape_of(w: _Walk, value: Any) -> tuple[int, ...]:
    """The shape of ``value``, a tensor node by construction (one with a layout: every tensor node has a shape)."""
    shape = w.shape(value)
    assert shape is not None, f"no shape recorded for {value!r}"
    return shape


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _dims_arg(node: fx.Node, start: int) -> list[Any]:
    """``x.permute(0, 2, 1)`` and ``x.permute([0, 2, 1])`` alike: the dims given from position ``start``."""
    rest = list(node.args[start:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    if not rest:
        for key in ("dims", "shape", "size"):
            if key in node.kwargs:
                return list(cast(Sequence[Any], node.kwargs[key]))
    return rest


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _parameter_owner(w: _Walk, arg: Any, user: fx.Node) -> tuple[str, type, str] | None:
    """``(module path, module class, attribute)`` of a ``get_attr`` node that ``user`` reads; None otherwise.

    A traced graph may keep only a plain container of the module's tensors; the class is
    then the one the module stack of ``user`` (the node calling from the module's forward) records.
    """
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    path, _, name = str(arg.target).rpartition(".")
    cls = type(w.modules[path]) if path in w.modules else nn.Module
    if cls is nn.Module:
        stack = (user.meta.get("nn_module_stack") or {}).values()
        cls = next((c for p, c in stack if p == path and isinstance(c, type)), cls)
    return path, cls, name


# Ops that only add, drop or broadcast size-1 dims of a tensor (or change its dtype): a parameter seen through
# them still holds one entry per channel.
_SHAPE_ONLY = ("reshape", "view", "unsqueeze", "expand", "expand_as", "to", "type_as", "contiguous", "float")


def _parameter_source(w: _Walk, value: Any, dim: int) -> tuple[str, int] | None:
    """``(parameter path, its dim)`` when ``value`` is a parameter seen through :data:`_SHAPE_ONLY` ops.

    ``dim`` is the dim of ``value`` that lines up with the channels; the result names the
    dim of the parameter itself that holds them (ConvNeXt's ``gamma.reshape(1, -1, 1, 1)``,
    ViT's ``class_token.expand(n, -1, -1)``). None for any other value.
    """
    shape = w.shape(value)
    if shape is None or not 0 <= dim < len(shape) or shape[dim] == 1:
        return None
    while isinstance(value, fx.Node) and value.op in ("call_method", "call_function"):
        name = getattr(value.target, "__name__", value.target)
        source = value.args[0] if value.args else None
        before, after = w.shape(source), w.shape(value)
        if name not in _SHAPE_ONLY or before is None or after is None:
            return None
        if name in ("expand", "expand_as"):  # broadcast from the right: the channels' dim keeps its size
            dim -= len(after) - len(before)
            if dim < 0 or before[dim] != after[dim + len(after) - len(before)]:
                return None
        else:  # only size-1 dims come or go: the other dims keep their order
            kept_before = [i for i, s in enumerate(before) if s != 1]
            kept_after = [i for i, s in enumerate(after) if s != 1]
            if [before[i] for i in kept_before] != [after[i] for i in kept_after]:
                return None
            dim = kept_before[kept_after.index(dim)]
        value = source
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return None
    return str(value.target), dim
