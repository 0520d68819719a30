"""Channel rules for per-channel and per-group norms: ``F.batch_norm``, ``F.instance_norm``, group norms.

timm's norm-act layers (``BatchNormAct2d``, ``GroupNormAct``, ...) subclass the torch
norms but are traced through: their ``forward`` calls ``F.batch_norm`` / ``F.group_norm``
on the module's own parameters and buffers (``get_attr`` nodes), then an activation.

* Batch and instance norms normalise every channel on its own: their statistics and
  affine parameters follow the channels (one endpoint for the whole norm module when
  they all belong to one, as for a BatchNorm module), and replication is exact.
* A group norm normalises groups of consecutive channels together: channels may only be
  permuted within their group (like the blocks of a grouped conv), and replicating one
  changes its group's statistics, so replication is refused; with one channel per group
  it is an instance norm, and widening rewrites its group count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from surgery.channels.edits import ChannelMap, take_rows
from surgery.channels.groups import Endpoint, Layout
from surgery.channels.registry import _FUNCTION_RULES, _LITERAL_EDITS, _MODULE_RULES, _register, register_edit
from surgery.channels.rules.arguments import _arg, _node, _parameter_owner
from surgery.channels.walk import _Walk

_BATCH_NORM_ARGS = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
_GROUP_NORM_ARGS = ((2, "weight"), (3, "bias"))
_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
_OWN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _channels_on_dim1(w: _Walk, node: fx.Node) -> Layout | None:
    """The layout of a norm's input when its channels are on dim 1 (blocked and None otherwise)."""
    layout = w.layout(node.args[0])
    if layout is not None and layout.dim != 1:
        w.block([layout], f"{w.describe(node)} normalises dim 1 but these channels are on dim {layout.dim}")
        return None
    return layout


def _follow_parameters(w: _Walk, node: fx.Node, layout: Layout, arguments: tuple[tuple[int, str], ...]) -> None:
    """The per-channel tensors a functional norm reads follow ``layout``: as one module when they are a norm's own."""
    given = [(name, p) for pos, name in arguments if (p := _arg(node, pos, name)) is not None]
    computed = [name for name, p in given if not isinstance(p, fx.Node) or p.op != "get_attr"]
    if computed:
        w.block([layout], f"{w.describe(node)} takes a computed {computed[0]}")
        return
    owners = [_parameter_owner(w, p, node) for _, p in given]
    first = owners[0] if owners else None
    if (
        first is not None
        and issubclass(first[1], _NORM_MODULES)
        and all(o is not None and o[0] == first[0] and o[2] in _OWN_TENSORS for o in owners)
    ):
        w.add(layout, "followers", Endpoint(node.name, first[0], first[1].__name__, node.name))
        return
    for _, p in given:
        w.add(layout, "followers", Endpoint(node.name, str(p.target), "parameter", node.name))


@_register(_FUNCTION_RULES, [F.batch_norm, F.instance_norm])
def _batch_norm_function(w: _Walk, node: fx.Node) -> Layout | None:
    """``F.batch_norm`` / ``F.instance_norm``: statistics, weight and bias follow the channels on dim 1."""
    layout = _channels_on_dim1(w, node)
    if layout is not None:
        _follow_parameters(w, node, layout, _BATCH_NORM_ARGS)
    return layout


def _group_norm(w: _Walk, node: fx.Node, groups: Any, follow: Callable[[Layout], None], literal: bool) -> Layout | None:
    """A norm over ``groups`` groups of consecutive channels on dim 1 (see the module doc)."""
    layout = _channels_on_dim1(w, node)
    if layout is None:
        return None
    if not isinstance(groups, int):
        w.block([layout], f"{w.describe(node)} normalises these channels in a computed number of groups")
        return layout
    follow(layout)
    if groups == layout.size:
        if literal:
            w.add(layout, "literals", Endpoint(node.name, node.name, "group_norm", _node(node.args[0]).name, dim=1))
        return layout
    w.require_blocks(layout, groups, node, "group norm")
    w.block(
        [layout],
        f"{w.describe(node)} normalises groups of {layout.size // groups} channels together: "
        "replicating a channel changes its group's statistics",
        replication_only=True,
    )
    return layout


@_register(_FUNCTION_RULES, [F.group_norm])
def _group_norm_function(w: _Walk, node: fx.Node) -> Layout | None:
    return _group_norm(
        w, node, _arg(node, 1, "num_groups"), lambda lay: _follow_parameters(w, node, lay, _GROUP_NORM_ARGS), True
    )


@_register(_MODULE_RULES, [nn.GroupNorm])
def _group_norm_module(w: _Walk, node: fx.Node, gn: nn.GroupNorm) -> Layout | None:
    def follow(layout: Layout) -> None:
        w.add(layout, "followers", Endpoint(node.name, str(node.target), "GroupNorm", node.name))

    return _group_norm(w, node, gn.num_groups, follow, False)


def _rewrite_group_count(node: fx.Node, ep: Endpoint, moved: Callable[[int], int], size: int) -> None:
    """One group per channel: the group count becomes the new channel count."""
    if len(node.args) > 1:
        node.args = (node.args[0], moved(size), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "num_groups": moved(size)}


_LITERAL_EDITS.register("group_norm", _rewrite_group_count)


def _groupnorm_through(gn: nn.GroupNorm, m: ChannelMap, ep: Endpoint) -> None:
    """The weight edit of ``nn.GroupNorm``: its per-channel scale and shift follow the map."""
    take_rows(gn, m)
    if gn.num_groups == gn.num_channels:  # one channel per group: an instance norm, whose group count follows
        gn.num_groups = m.size
    gn.num_channels = m.size


register_edit(nn.GroupNorm, through=_groupnorm_through)
