"""Channel rules for ops that reduce over dims: pooling and resizing, softmax, and mean/sum/amax/amin.

Channels on a dim that is not reduced pass through (moving down past dropped dims);
reducing or normalising over the channel dim itself blocks them.
"""

from __future__ import annotations

from torch import fx, nn

from surgery.channels.groups import Layout
from surgery.channels.registry import (
    _MODULE_RULES,
    _register,
    register_rule,
)
from surgery.channels.rules.arguments import _arg, _norm, _shape_of
from surgery.channels.walk import _Walk
from surgery.graph.ops import targets


def _spatial(w: _Walk, node: fx.Node) -> Layout | None:
    """Pooling and resizing act on the last two dims; channels elsewhere pass through."""
    x = node.args[0]
    layout = w.layout(x)
    ndim = len(w.shape(x) or ())
    if layout is not None and layout.dim >= ndim - 2:
        w.block([layout], f"{w.describe(node)} pools over the dim that carries these channels")
        return None
    return layout


register_rule(*targets("adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "interpolate"))(
    _spatial
)


@_register(_MODULE_RULES, [nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample])
def _spatial_module(w: _Walk, node: fx.Node, module: nn.Module) -> Layout | None:
    return _spatial(w, node)


def _softmax_like(w: _Walk, node: fx.Node, dim: int | None) -> Layout | None:
    x = node.args[0]
    layout = w.layout(x)
    if layout is not None and (dim is None or _norm(dim, len(w.shape(x) or ())) == layout.dim):
        w.block([layout], f"{w.describe(node)} normalises over these channels")
        return None
    return layout


@_register(_MODULE_RULES, [nn.Softmax])
def _softmax_module(w: _Walk, node: fx.Node, module: nn.Softmax) -> Layout | None:
    return _softmax_like(w, node, module.dim)


@register_rule(*targets("softmax"))
def _softmax(w: _Walk, node: fx.Node) -> Layout | None:
    return _softmax_like(w, node, _arg(node, 1, "dim"))


# A mean, maximum or minimum over the channels is the same when every channel is copied the same number of times.
_UNIFORM_REDUCTIONS = {"mean", "amax", "amin", "mean.dim", "amax.default", "amin.default"}


@register_rule(*targets("mean", "sum", "amax", "amin"))
def _reduce(w: _Walk, node: fx.Node) -> Layout | None:
    x = node.args[0]
    layout = w.layout(x)
    if layout is None:
        return None
    ndim = len(_shape_of(w, x))
    dims = _arg(node, 1, "dim")
    if dims is None:
        w.block([layout], f"{w.describe(node)} reduces over these channels")
        return None
    dims = [_norm(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if layout.dim in dims:
        if getattr(node.target, "__name__", node.target) in _UNIFORM_REDUCTIONS:  # RMSNorm's mean of squares
            w.require_uniform(layout, f"{w.describe(node)} averages over these channels")
        else:
            w.block([layout], f"{w.describe(node)} reduces over these channels")
        return None
    keep = _arg(node, 2, "keepdim", False)
    return layout.at(layout.dim - (0 if keep else sum(d < layout.dim for d in dims)))
