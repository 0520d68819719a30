"""Rewrite weights so coupled channels follow an index map: permutations here, replications in ``growth``.

A :class:`~surgery.channels.edits.ChannelMap` says, for each new channel position, which old channel it
holds (``-1``: a fresh channel). :func:`remap_channels` applies one map per coupled
group (see :mod:`surgery.channels`): producers and followers take the rows of their
old channels, consumers take the matching input columns divided by how many times
each old channel now appears (so a replicated channel contributes once in total,
and a fresh channel contributes nothing). A permutation is the special case where
every count is 1; the network's function is unchanged either way. What each kind of
layer does with a map is its :class:`~surgery.channels.edits.WeightEdit`, registered
with :func:`surgery.channels.register_edit` next to the layer's channel rule.

>>> import torch, torchvision, surgery
>>> net = torchvision.models.resnet18().eval()
>>> perm = torch.randperm(128).tolist()
>>> moved = surgery.permute_channels(net, "layer2", perm).eval()
>>> x = torch.randn(1, 3, 64, 64)
>>> bool((moved(x) - net(x)).abs().max() < 1e-4)
True
>>> torch.equal(moved.layer2[1].conv2.weight, net.layer2[1].conv2.weight[perm])
True
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import fx, nn

from surgery.channels import ChannelAnalysis, Endpoint, Layout, analyze_channels
from surgery.channels.edits import ChannelMap, WeightEdit, layout_map, set_tensor, take
from surgery.channels.registry import HEAD_EDITS, LITERAL_EDITS, WEIGHT_EDITS
from surgery.core.errors import SurgeryError
from surgery.core.recipe import extend_recipe, register_replay
from surgery.graph.capture import traced_copy

__all__ = ["ChannelMap", "layout_map", "permute_channels", "remap_channels"]


def _owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    """The module holding the tensor at dotted path ``target``, and the tensor's name in it."""
    owner_path, _, name = target.rpartition(".")
    return (gm.get_submodule(owner_path) if owner_path else gm), name


def _remap_parameter(gm: fx.GraphModule, ep: Endpoint, m: ChannelMap) -> None:
    owner, name = _owner(gm, ep.target)
    set_tensor(owner, name, take(getattr(owner, name).detach(), ep.dim, m))


def _edit_layer(
    module: nn.Module,
    target: str,
    role: str,
    m: ChannelMap,
    ep: Endpoint,
    noise: float,
    generator: torch.Generator | None,
) -> None:
    """Apply the registered weight edit of ``module``'s class for ``role`` (``out``, ``in`` or ``through``)."""
    edit = WEIGHT_EDITS.for_class(type(module)) or WeightEdit()
    refused = SurgeryError(f"cannot change the channels of '{target}' ({type(module).__name__}) as a {role} layer")
    if role == "in":
        if edit.inp is None:
            raise refused
        edit.inp(module, m, noise, generator)
    elif role == "out":
        if edit.out is None:
            raise refused
        edit.out(module, m)
    else:
        if edit.through is None:
            raise refused
        edit.through(module, m, ep)


def _boundaries(layout: Layout, maps: dict[int, ChannelMap]) -> dict[int, int]:
    """Old position -> new position of every segment boundary along ``layout``'s dim under ``maps``."""
    table, old, new = {0: 0}, 0, 0
    for s in layout.segments:
        old += s.size
        new += maps[s.group].size * s.inner if s.group in maps else s.size
        table[old] = new
    return table


def _rewrite_literal(node: fx.Node, ep: Endpoint, layout: Layout, maps: dict[int, ChannelMap]) -> bool:
    """Rewrite the channel counts a graph node spells out (a slice, a split) for ``maps``; True if it changed."""
    table = _boundaries(layout, maps)
    if all(k == v for k, v in table.items()):
        return False

    def moved(position: int) -> int:
        if position not in table:
            raise SurgeryError(f"node '{node.name}' cuts channels at position {position}, inside a channel group")
        return table[position]

    LITERAL_EDITS.get(ep.kind)(node, ep, moved, layout.size)
    return True


def remap_channels(
    gm: fx.GraphModule,
    analysis: ChannelAnalysis,
    maps: dict[int, ChannelMap],
    *,
    keep_producers: Collection[str] = (),
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> None:
    """Edit ``gm``'s weights in place so each group ``g`` in ``maps`` takes the channels ``maps[g]``.

    ``analysis`` must describe ``gm``'s graph. Producers in ``keep_producers`` (node names)
    are left alone: their output is extended by other means (a concatenation). ``noise``
    is passed to the consumers' columns (see :func:`surgery.channels.edits.read_columns`). The graph only changes where
    it spells out a channel count that changes (a slice bound, split sizes: the groups'
    ``literals``); it is then recompiled.
    """
    edits: dict[tuple[str, str, int], tuple[str, Endpoint]] = {}
    for gid in maps:
        group = analysis.groups[gid]
        roles = (("out", group.producers), ("through", group.followers), ("in", group.consumers))
        for role, endpoints in (*roles, ("literal", group.literals)):
            for ep in endpoints:
                if role == "out" and ep.node in keep_producers:
                    continue
                edits.setdefault((ep.target, role, ep.dim), (role, ep))
    order = {"out": 0, "through": 1, "in": 2, "literal": 3}
    nodes = {n.name: n for n in gm.graph.nodes}
    rewritten = False
    for (target, role, _), (_, ep) in sorted(edits.items(), key=lambda kv: order[kv[1][0]]):
        layout = analysis.layouts[ep.space]
        if role == "literal":
            rewritten = _rewrite_literal(nodes[ep.node], ep, layout, maps) or rewritten
            continue
        m = layout_map(layout, maps)
        if m is None:
            continue
        if ep.kind == "parameter":
            _remap_parameter(gm, ep, m)
            continue
        if ep.kind in HEAD_EDITS:
            if m.size != m.old:  # permutations of the embedding leave the heads as they are
                owner, name = _owner(gm, ep.target)
                index = HEAD_EDITS.get(ep.kind)(m.old, m.size, ep.groups)
                set_tensor(owner, name, getattr(owner, name).detach().index_select(ep.dim, index))
            continue
        _edit_layer(gm.get_submodule(target), target, role, m, ep, noise, generator)
    if rewritten:
        gm.recompile()


# ----------------------------------------------------------------------------- permute_channels


def permute_channels(model: nn.Module, at: str, perm: Sequence[int], *, example_input: Any = None) -> fx.GraphModule:
    """Permute the channels of the value at cut name ``at`` and every weight that touches them.

    The producer(s) of the value (all of them when it is a residual stream), their
    BatchNorms and depthwise convs, and every consumer are permuted so the model's
    output is unchanged. Returns a new GraphModule; ``model`` is untouched.

    Args:
        model: any fx-traceable module (or GraphModule).
        at: a module path (``"layer2"``) or fx node name whose output to permute.
        perm: new channel ``j`` is old channel ``perm[j]``.
        example_input: an input fixing the shapes, if the default image sizes do not run.

    >>> import torch, surgery
    >>> net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32).eval()
    >>> perm = torch.randperm(8).tolist()
    >>> shuffled = surgery.permute_channels(net, "features.0", perm).eval()
    >>> torch.equal(shuffled.features[0].block.conv.weight, net.features[0].block.conv.weight[perm])
    True
    >>> x = torch.randn(2, 3, 32, 32)
    >>> bool((shuffled(x) - net(x)).abs().max() < 1e-5)
    True
    """
    result = traced_copy(model)
    analysis = analyze_channels(result, example_input)
    group = analysis.group_at(at)
    reason = group.obstacle(replicate=False)
    if reason is not None:
        raise SurgeryError(f"the channels at '{at}' cannot be permuted without changing the output: {reason}")
    if len(perm) != group.channels:
        raise SurgeryError(
            f"perm has {len(perm)} entries but '{at}' has {group.channels} channels; give a "
            f"permutation of 0..{group.channels - 1}"
        )
    remap_channels(result, analysis, {group.id: ChannelMap.permutation(perm, group.blocks)})
    args: dict[str, Any] = {"at": at, "perm": [int(p) for p in perm]}
    if example_input is not None:
        args["input_shape"] = list(example_input.shape)
    extend_recipe(result, model, "permute_channels", **args)
    return result


@register_replay("permute_channels")
def _replay_permute(model: nn.Module, at: str, perm: list[int], input_shape: list[int] | None = None) -> nn.Module:
    return permute_channels(model, at, perm, example_input=torch.zeros(input_shape) if input_shape else None)
