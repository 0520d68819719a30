"""net2wider: replicate channels of a layer, and of everything coupled to it, without changing the function.

New channels copy randomly chosen old ones (incoming weights, bias, BatchNorm
statistics, depthwise filters); every layer reading them divides the copies'
weights by the replication count. Where the layer writes a residual stream or feeds
a concatenation, the whole coupled group (:mod:`surgery.channels`) widens together.

>>> import torch, torchvision, growth
>>> net = torchvision.models.resnet18().eval()
>>> wide = growth.net2wider(net, "layer2.0.conv2", factor=1.5, seed=0).eval()
>>> wide.layer2[0].conv2.out_channels, wide.layer2[0].downsample[0].out_channels, wide.layer3[0].conv1.in_channels
(192, 192, 192)
>>> x = torch.randn(1, 3, 64, 64)
>>> bool((wide(x) - net(x)).abs().max() <= 1e-4 * net(x).abs().max())
True
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from growth.errors import GrowthError
from growth.graphedit import Workbench
from growth.registry import MAX_GROWTH, GrowthOp, Proposal, not_applicable, register_op
from growth.transformer.heads import grow_heads, head_counts, head_sites
from surgery.channels import ChannelGroup
from surgery.channels.layouts import attention_heads
from surgery.channels.remap import ChannelMap, remap_channels


def net2wider(
    model: nn.Module,
    at: str | Sequence[str],
    factor: float | None = None,
    new_width: int | None = None,
    noise: float = 0.0,
    seed: int | None = None,
    *,
    example_input: Any = None,
    check: bool = False,
) -> fx.GraphModule:
    """Widen the output channels (features) of layer ``at`` and everything coupled to it.

    Args:
        model: any fx-traceable module; it is not modified.
        at: a Conv2d/Linear module path or fx node name, or a list of them: every
            coupled group named is widened once, in one pass.
        factor: new width = ``ceil(C * factor)`` (rounded up to a multiple of the
            blocks of grouped convs that read the channels); must be > 1.
        new_width: the new width instead of ``factor``; must be larger than C.
        noise: std of zero-sum noise added to the copies' outgoing weights, relative to
            the weights' std (breaks the symmetry of copies; the output stays the same).
        seed: seeds which channels are copied (and the noise); recorded for replay.
        example_input: an input fixing the shapes (default: a small image size that runs).
        check: run both models on an example input and raise if the output moved.

    >>> import torch, torchvision, growth
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> wide = growth.net2wider(net, "layer2.0.conv1", factor=1.5, seed=0, check=True).eval()
    >>> wide.layer2[0].conv1.out_channels
    192
    >>> x = torch.randn(2, 3, 32, 32)
    >>> bool((wide(x) - net(x)).abs().max() < 1e-4)
    True
    """
    names = [at] if isinstance(at, str) else list(at)
    if not names:
        raise GrowthError("net2wider needs at least one layer name in at=")
    _check_amount(factor, new_width)
    seed = random.randrange(2**31) if seed is None else int(seed)
    heads = [name for name in names if name in head_sites(model)]
    if heads:  # attention sites grow on the model's own modules, before the graph is traced
        if factor is None:
            raise GrowthError("attention sites grow by a factor of their heads: give factor= (e.g. 2), not new_width=")
        source, model = model, grow_heads(model, heads, factor, seed, example_input, check)
        names = [name for name in names if name not in heads]
        if not names:
            work = Workbench(model, example_input)
            work.source = source
            return work.finish("net2wider", check, at=at if isinstance(at, str) else heads, factor=factor, seed=seed)
    work = Workbench(model, example_input)
    widths: dict[int, tuple[ChannelGroup, int]] = {}
    for name in names:
        group = widenable_group(work, name)
        if group.id not in widths:
            widths[group.id] = (group, _new_width(group, name, factor, new_width))
    generator = torch.Generator().manual_seed(seed)
    maps = {gid: replication_map(group, width, generator) for gid, (group, width) in widths.items()}
    remap_channels(work.gm, work.analysis, maps, noise=noise, generator=generator)
    return work.finish(
        "net2wider",
        check,
        at=at if isinstance(at, str) else names,
        factor=factor,
        new_width=new_width,
        noise=noise,
        seed=seed,
    )


def _check_amount(factor: float | None, new_width: int | None) -> None:
    if (factor is None) == (new_width is None):
        raise GrowthError("give exactly one of factor= (e.g. 1.5) or new_width= to net2wider")
    if factor is not None and not factor > 1:
        raise GrowthError(f"factor={factor} does not widen; give a factor > 1 (e.g. 1.5)")
    if factor is not None and factor > MAX_GROWTH:
        raise GrowthError(f"factor={factor} is more than one step grows (at most {MAX_GROWTH}); widen in several steps")


def _new_width(group: ChannelGroup, name: str, factor: float | None, new_width: int | None) -> int:
    channels, blocks = group.channels, group.blocks
    if group.uniform:
        width = round(channels * factor) if factor is not None else new_width
        assert width is not None, "the caller has checked that factor or new_width is given"
        if width % channels or (factor is not None and abs(factor - round(factor)) > 1e-9):
            raise GrowthError(
                f"{group.uniform[0]}: widening '{name}' keeps its statistics only when every "
                "channel is copied the same "
                f"number of times; give an integer factor (2, 3, ...) or a multiple of {channels} channels"
            )
    if new_width is None:
        assert factor is not None, "the caller has checked that factor or new_width is given"
        return max(channels + blocks, math.ceil(channels * factor / blocks - 1e-9) * blocks)
    if new_width > MAX_GROWTH * channels:
        raise GrowthError(
            f"new_width={new_width} is more than {MAX_GROWTH}x the {channels} channels at '{name}'; "
            "widen in several steps"
        )
    if new_width <= channels:
        raise GrowthError(
            f"new_width={new_width} is not larger than the {channels} channels at '{name}'; give a larger width"
        )
    if new_width % blocks:
        raise GrowthError(
            f"new_width={new_width} at '{name}' is not a multiple of {blocks}: grouped convs read "
            f"these channels in {blocks} blocks"
        )
    return new_width


def replication_map(group: ChannelGroup, width: int, generator: torch.Generator) -> ChannelMap:
    """Old channels first within each block, then copies drawn uniformly from the same block.

    A group whose statistics are taken over its channels (``group.uniform``) copies every
    channel the same number of times instead: the old channels, then each of them again.
    """
    blocks, channels = group.blocks, group.channels
    if group.uniform:  # every channel k times, each block's copies inside the block
        per = channels // blocks
        index = (torch.arange(per).repeat(width // channels) + (torch.arange(blocks) * per)[:, None]).flatten()
        return ChannelMap(index, channels)
    per_block, extra = channels // blocks, (width - channels) // blocks
    picks = torch.randint(per_block, (blocks, extra), generator=generator) + (torch.arange(blocks) * per_block)[:, None]
    index = torch.cat([torch.arange(channels).view(blocks, per_block), picks], dim=1).flatten()
    return ChannelMap(index, channels)


def _obstacle(work: Workbench, node: fx.Node) -> tuple[ChannelGroup | None, str | None]:
    layout = work.analysis.layout(node.name)
    if layout is None:
        return None, "its output carries no channels the analysis follows"
    if len(layout.segments) != 1 or layout.segments[0].inner != 1:
        return None, f"its output joins {len(layout.segments)} channel groups; name a layer that feeds it"
    group = work.analysis.groups[layout.segments[0].group]
    return group, group.obstacle(replicate=True)


def widenable_group(work: Workbench, name: str) -> ChannelGroup:
    """The coupled group whose channels ``name`` outputs, or a one-line refusal listing the sites."""
    group, reason = _obstacle(work, work.node(name))
    if reason is not None or group is None:
        raise not_applicable("net2wider", name, reason or "", wider_sites(work))
    return group


def _widenable(work: Workbench) -> list[tuple[str, ChannelGroup]]:
    return [(ep.target, g) for ep, g in work.analysis.producer_groups() if g.obstacle(replicate=True) is None]


def _accepts(group: ChannelGroup, name: str, factor: float | None, new_width: int | None) -> bool:
    """Does net2wider take this amount at ``name`` (the op's own check); any amount when none is given."""
    if factor is None and new_width is None:
        return True
    try:
        _new_width(group, name, factor, new_width)
    except GrowthError:
        return False
    return True


def wider_sites(work: Workbench, factor: float | None = None, new_width: int | None = None) -> list[str]:
    """Every Conv2d/Linear whose output channels can be widened (by ``factor`` or to ``new_width``), in graph order.

    With an amount, only the sites net2wider accepts it at: a stream normalised over its
    channels (LayerNorm) widens by integer factors only.
    """
    if factor is not None or new_width is not None:
        _check_amount(factor, new_width)
    found = [name for name, group in _widenable(work) if _accepts(group, name, factor, new_width)]
    return found + [site for site in head_sites(work.source) if _heads_accept(work.source, site, factor, new_width)]


def _heads_accept(model: nn.Module, site: str, factor: float | None, new_width: int | None) -> bool:
    """Does an attention site take this amount (a factor giving whole heads; any amount when none is given)."""
    if new_width is not None:
        return False
    if factor is None:
        return True
    heads, kv_heads, _ = attention_heads(model.get_submodule(site))
    return head_counts(heads, kv_heads, factor) is not None


def _propose(rng: random.Random, work: Workbench) -> Proposal | None:
    found = _widenable(work)
    if not found:
        return None
    name, group = rng.choice(found)
    factors = [f for f in (1.25, 1.5, 2.0) if _accepts(group, name, f, None)]  # 2.0 goes everywhere
    return name, {"factor": rng.choice(factors), "seed": rng.randrange(2**31)}


register_op(GrowthOp("net2wider", net2wider, ("at",), wider_sites, _propose, probability=0.3))
