"""Channel rules for the layers that own per-channel weights: Conv2d, Linear, batch/instance norms and PReLU.

Convs and Linears *consume* the channels they read and *produce* a new group; batch and
instance norms, depthwise convs and per-channel PReLU *follow* the channels they pass
through. ``F.conv2d`` and ``F.linear`` count as the layer whose ``weight`` (and ``bias``)
they read, as when a Conv2d or Linear subclass (timm's ``Conv2dSame``, ``Linear``) calls
them from its own ``forward``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from surgery.channels.edits import ChannelMap, read_columns, set_tensor, take_rows
from surgery.channels.groups import Endpoint, Layout, Segment
from surgery.channels.registry import _MODULE_RULES, _register, register_edit, register_rule
from surgery.channels.rules.arguments import _arg, _node, _parameter_owner
from surgery.channels.walk import _fallback, _Walk
from surgery.graph.ops import targets


def _conv_layer(w: _Walk, node: fx.Node, path: str, out_channels: int, groups: int, depthwise: bool) -> Layout | None:
    x = node.args[0]
    layout = w.layout(x)
    shape = w.shape(x)
    if layout is not None and (layout.dim != 1 or shape is None or len(shape) != 4):
        w.block([layout], f"{w.describe(node)} reads dim 1 but these channels are on dim {layout.dim}")
        layout = None
    if depthwise:
        if layout is not None:
            w.add(layout, "followers", Endpoint(node.name, path, "Conv2d", node.name))
        return layout
    if layout is not None:
        w.require_blocks(layout, groups, node, "grouped conv")
        w.add(layout, "consumers", Endpoint(node.name, path, "Conv2d", _node(x).name, groups=groups))
    out = Layout(1, (Segment(w.new_group(out_channels, groups), out_channels),))
    w.add(out, "producers", Endpoint(node.name, path, "Conv2d", node.name, groups=groups))
    return out


def _linear_layer(w: _Walk, node: fx.Node, path: str, out_features: int) -> Layout | None:
    x = node.args[0]
    layout = w.layout(x)
    ndim = len(w.shape(x) or (0, 0))
    if layout is not None and layout.dim != ndim - 1:
        w.block([layout], f"{w.describe(node)} mixes dim {ndim - 1} but these channels are on dim {layout.dim}")
        layout = None
    if layout is not None:
        w.add(layout, "consumers", Endpoint(node.name, path, "Linear", _node(x).name))
    out = Layout(ndim - 1, (Segment(w.new_group(out_features), out_features),))
    w.add(out, "producers", Endpoint(node.name, path, "Linear", node.name))
    return out


@_register(_MODULE_RULES, [nn.Conv2d])
def _conv(w: _Walk, node: fx.Node, conv: nn.Conv2d) -> Layout | None:
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    return _conv_layer(w, node, str(node.target), conv.out_channels, conv.groups, depthwise)


@_register(_MODULE_RULES, [nn.Linear])
def _linear(w: _Walk, node: fx.Node, linear: nn.Linear) -> Layout | None:
    return _linear_layer(w, node, str(node.target), linear.out_features)


def _own_weight(w: _Walk, node: fx.Node, kind: type) -> tuple[str, torch.Tensor] | None:
    """The path and weight of the ``kind`` layer whose own ``weight`` and ``bias`` a functional call reads."""
    weight = _parameter_owner(w, _arg(node, 1, "weight"), node)
    if weight is None or weight[2] != "weight" or not issubclass(weight[1], kind):
        return None
    path = weight[0]
    bias = _arg(node, 2, "bias")
    if bias is not None and _parameter_owner(w, bias, node) != (path, weight[1], "bias"):
        return None
    return path, w.modules[path].weight


@register_rule(*targets("conv2d"))
def _conv_function(w: _Walk, node: fx.Node) -> Layout | None:
    """``F.conv2d`` on a Conv2d's own weight (``Conv2dSame``): that conv, its groups as the call gives them."""
    owner = _own_weight(w, node, nn.Conv2d)
    groups = _arg(node, 6, "groups", 1)
    if owner is None or not isinstance(groups, int):
        _fallback(w, node)
        return None
    path, weight = owner
    out_channels, in_channels = weight.shape[0], weight.shape[1] * groups
    return _conv_layer(w, node, path, out_channels, groups, 1 < groups == in_channels == out_channels)


@register_rule(*targets("linear"))
def _linear_function(w: _Walk, node: fx.Node) -> Layout | None:
    """``F.linear`` on a Linear's own weight (timm's ``Linear``): that Linear."""
    owner = _own_weight(w, node, nn.Linear)
    if owner is None:
        _fallback(w, node)
        return None
    return _linear_layer(w, node, owner[0], owner[1].shape[0])


@_register(_MODULE_RULES, [nn.modules.batchnorm._NormBase])
def _batchnorm(w: _Walk, node: fx.Node, bn: nn.Module) -> Layout | None:
    """Batch and instance norms: per-channel statistics and affine parameters follow the channels."""
    layout = w.layout(node.args[0])
    if layout is None:
        return None
    if layout.dim != 1:
        w.block([layout], f"{w.describe(node)} normalises dim 1 but these channels are on dim {layout.dim}")
        return None
    w.add(layout, "followers", Endpoint(node.name, str(node.target), type(bn).__name__, node.name))
    return layout


@_register(_MODULE_RULES, [nn.PReLU])
def _prelu(w: _Walk, node: fx.Node, prelu: nn.PReLU) -> Layout | None:
    layout = w.layout(node.args[0])
    if layout is not None and prelu.num_parameters > 1:
        if layout.dim != 1:
            w.block(
                [layout],
                f"{w.describe(node)} has one slope per dim-1 channel but these channels are on dim {layout.dim}",
            )
            return None
        w.add(layout, "followers", Endpoint(node.name, str(node.target), "PReLU", node.name))
    return layout


# ----------------------------------------------------------------------------- weight edits


def _conv_out(conv: nn.Conv2d, m: ChannelMap) -> None:
    take_rows(conv, m)
    conv.out_channels = m.size


def _conv_in(conv: nn.Conv2d, m: ChannelMap, noise: float, gen: torch.Generator | None) -> None:
    set_tensor(conv, "weight", read_columns(conv.weight.detach(), m, conv.groups, noise, gen))
    conv.in_channels = m.size


def _conv_through(conv: nn.Conv2d, m: ChannelMap, ep: Endpoint) -> None:
    take_rows(conv, m)
    conv.in_channels = conv.out_channels = conv.groups = m.size


def _linear_out(linear: nn.Linear, m: ChannelMap) -> None:
    take_rows(linear, m)
    linear.out_features = m.size


def _linear_in(linear: nn.Linear, m: ChannelMap, noise: float, gen: torch.Generator | None) -> None:
    set_tensor(linear, "weight", read_columns(linear.weight.detach(), m, 1, noise, gen))
    linear.in_features = m.size


def _batchnorm_through(bn: nn.modules.batchnorm._NormBase, m: ChannelMap, ep: Endpoint) -> None:
    take_rows(bn, m, ("weight", "bias", "running_mean", "running_var"))
    bn.num_features = m.size


def _prelu_through(prelu: nn.PReLU, m: ChannelMap, ep: Endpoint) -> None:
    take_rows(prelu, m, ("weight",))
    prelu.num_parameters = m.size


register_edit(nn.Conv2d, out=_conv_out, inp=_conv_in, through=_conv_through)
register_edit(nn.Linear, out=_linear_out, inp=_linear_in)
register_edit(nn.modules.batchnorm._NormBase, through=_batchnorm_through)
register_edit(nn.PReLU, through=_prelu_through)
