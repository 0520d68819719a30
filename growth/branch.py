"""net2branch: an Inception-like branch beside a layer, whose contribution starts at exactly zero.

Beside a Conv2d ``at`` and from the same input: a 1x1 conv, a ReLU and a kxk conv
with ``at``'s stride and a padding that gives the same output size; the last conv
starts at zero (weights and bias). ``merge="add"`` adds the branch to ``at``'s
output; ``merge="concat"`` appends its channels to ``at``'s output and gives every
reader of those channels a zero input slice for them. A Linear ``at`` gets a
Linear -> ReLU -> Linear branch on its last dim.

>>> import torch, torchvision, growth
>>> net = torchvision.models.resnet18().eval()
>>> branched = growth.net2branch(net, "layer1.0.conv1", seed=0).eval()
>>> branched.layer1[0].net2branch0
Sequential(
  (0): Conv2d(64, 32, kernel_size=(1, 1), stride=(1, 1))
  (1): ReLU()
  (2): Conv2d(32, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
)
>>> x = torch.randn(1, 3, 64, 64)
>>> torch.equal(branched(x), net(x))
True
"""

from __future__ import annotations

import operator
import random
from typing import Any, cast

import torch
from torch import fx, nn

from growth.errors import GrowthError
from growth.graphedit import Workbench, seeded
from growth.registry import MAX_GROWTH, MAX_KERNEL, GrowthOp, Proposal, not_applicable, register_op
from surgery.channels.remap import ChannelMap, remap_channels

MERGES = ("add", "concat")


def net2branch(
    model: nn.Module,
    at: str,
    kernel_size: int = 3,
    hidden: int | None = None,
    merge: str = "add",
    width: int | None = None,
    seed: int | None = None,
    *,
    example_input: Any = None,
    check: bool = False,
) -> fx.GraphModule:
    """Add a zero-contribution branch beside the Conv2d/Linear ``at``.

    Args:
        model: any fx-traceable module; it is not modified.
        at: a Conv2d or Linear module path (or its fx node name).
        kernel_size: the branch's second kernel (its padding is chosen to match ``at``'s output size).
        hidden: channels between the branch's two layers (default: half of ``at``'s inputs, at least 1).
        merge: ``"add"`` or ``"concat"``.
        width: channels the branch appends with ``merge="concat"`` (default: half of ``at``'s outputs).
        seed: seeds the branch's first layer (default init); recorded for replay.
        example_input, check: see :func:`growth.net2wider`.

    >>> import torch, torchvision, growth
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> branched = growth.net2branch(net, "layer2.0.conv1", check=True).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> bool((branched(x) - net(x)).abs().max() < 1e-4)
    True
    """
    if merge not in MERGES:
        raise GrowthError(f"merge='{merge}' is not one of {', '.join(MERGES)}")
    if kernel_size < 1 or (hidden is not None and hidden < 1) or (width is not None and width < 1):
        raise GrowthError("kernel_size, hidden and width must be positive")
    if kernel_size > MAX_KERNEL:
        raise GrowthError(f"kernel_size={kernel_size} is larger than a step creates (at most {MAX_KERNEL})")
    if width is not None and merge == "add":
        raise GrowthError("width= only applies to merge='concat' (an added branch has the width of its layer)")
    seed = random.randrange(2**31) if seed is None else int(seed)
    work = Workbench(model, example_input)
    node = work.node(at)
    reason = branch_obstacle(work, node, kernel_size, merge)
    if reason is not None:
        raise not_applicable("net2branch", at, reason, branch_sites(work, kernel_size, merge))
    layer = work.module(node)
    assert isinstance(layer, (nn.Conv2d, nn.Linear)), "branch_obstacle has checked the layer"
    inputs, outputs = _widths(layer)
    if (hidden or 0) > MAX_GROWTH * inputs or (width or 0) > MAX_GROWTH * outputs:
        raise GrowthError(
            f"hidden/width at '{at}' more than {MAX_GROWTH}x the layer's own channels; grow in several steps"
        )
    out_width = outputs if merge == "add" else (width or max(1, outputs // 2))
    with seeded(seed):
        layers = _branch_layers(layer, hidden or max(1, inputs // 2), out_width, kernel_size, work.shapes.dtype)
    layout, dim = work.analysis.layout(node.name), 0
    if merge == "concat":
        assert layout is not None, "_concat_obstacle has checked that the output carries channels"
        dim = layout.dim
        group = work.analysis.groups[layout.segments[0].group]
        grown = ChannelMap(torch.cat([torch.arange(group.channels), torch.full((out_width,), -1)]), group.channels)
        remap_channels(work.gm, work.analysis, {group.id: grown}, keep_producers={node.name})
    source = node.args[0]
    assert isinstance(source, fx.Node), "a layer's input is a graph value"
    _, new_nodes = work.insert_chain(node, at, "net2branch", layers, source=source)
    if merge == "add":
        merged = work.insert_function(new_nodes[-1], operator.add, (node, new_nodes[-1]), like=node)
    else:
        merged = work.insert_function(
            new_nodes[-1], torch.cat, ([node, new_nodes[-1]],), like=node, kwargs={"dim": dim}
        )
    work.reroute(node, merged, keep=[merged])
    return work.finish(
        "net2branch", check, at=at, kernel_size=kernel_size, hidden=hidden, merge=merge, width=width, seed=seed
    )


def _widths(layer: nn.Conv2d | nn.Linear) -> tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


def branch_padding(conv: nn.Conv2d, kernel_size: int) -> tuple[tuple[int, int] | str | None, str | None]:
    """The padding that gives a stride-matched ``kernel_size`` conv ``conv``'s output size, or why none does."""
    if conv.padding == "same":
        return "same", None
    padding = (0, 0) if conv.padding == "valid" else cast("tuple[int, int]", conv.padding)  # a Conv2d's: two ints
    result = []
    for p, d, k in zip(padding, conv.dilation, conv.kernel_size):
        twice = 2 * p - d * (k - 1) + (kernel_size - 1)
        if twice < 0 or twice % 2:
            return None, (
                f"a {kernel_size}x{kernel_size} branch cannot match the output size of its {k}-wide kernel "
                f"(padding {p}, dilation {d}); try kernel_size={d * (k - 1) - 2 * p + 1}"
            )
        result.append(twice // 2)
    return (result[0], result[1]), None


def branch_obstacle(work: Workbench, node: fx.Node, kernel_size: int, merge: str) -> str | None:
    """Why a branch cannot go beside ``node``; None if it can."""
    layer = work.module(node)
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        what = type(layer).__name__ if layer is not None else f"a {node.op} node"
        return f"it is {what}, not a Conv2d or Linear layer"
    if isinstance(layer, nn.Conv2d):
        _, reason = branch_padding(layer, kernel_size)
        if reason is not None:
            return reason
    if merge == "concat":
        return _concat_obstacle(work, node)
    return None


def _concat_obstacle(work: Workbench, node: fx.Node) -> str | None:
    layout = work.analysis.layout(node.name)
    if layout is None:
        return "its output carries no channels the analysis follows"
    if len(layout.segments) != 1:
        return (
            f"its output holds {len(layout.segments)} channel groups (it is split further on); "
            "appended channels would join none"
        )
    group = work.analysis.groups[layout.segments[0].group]
    reason = group.obstacle(replicate=True)
    if reason is not None:
        return reason
    others = [p.target for p in group.producers if p.node != node.name]
    if others:
        return (
            f"its channels are coupled to {', '.join(others[:3])} (a residual addition or "
            "product), which would need the new channels too"
        )
    if group.blocks > 1:
        return f"grouped convs read its channels in {group.blocks} blocks; appended channels would cross them"
    return None


def _branch_layers(
    layer: nn.Conv2d | nn.Linear, hidden: int, width: int, kernel_size: int, dtype: torch.dtype
) -> list[nn.Module]:
    if isinstance(layer, nn.Conv2d):
        padding, _ = branch_padding(layer, kernel_size)
        assert padding is not None, "branch_obstacle has checked that a padding matches"
        stride = (layer.stride[0], layer.stride[1])
        first: nn.Module = nn.Conv2d(layer.in_channels, hidden, 1, dtype=dtype)
        last: nn.Module = nn.Conv2d(hidden, width, kernel_size, stride=stride, padding=padding, dtype=dtype)
    else:
        first, last = nn.Linear(layer.in_features, hidden, dtype=dtype), nn.Linear(hidden, width, dtype=dtype)
    with torch.no_grad():
        for p in last.parameters():  # its weight and bias
            p.zero_()
    return [first, nn.ReLU(), last]


def branch_sites(work: Workbench, kernel_size: int = 3, merge: str = "add") -> list[str]:
    """Every Conv2d/Linear beside which such a branch fits, in graph order."""
    return [
        work.site_name(n)
        for n in work.gm.graph.nodes
        if n.op == "call_module" and branch_obstacle(work, n, kernel_size, merge) is None
    ]


def _propose(rng: random.Random, work: Workbench) -> Proposal | None:
    merge = rng.choice(MERGES)
    found = branch_sites(work, 3, merge)
    if not found and merge == "concat":
        merge, found = "add", branch_sites(work, 3, "add")
    if not found:
        return None
    return rng.choice(found), {"kernel_size": 3, "merge": merge, "seed": rng.randrange(2**31)}


register_op(GrowthOp("net2branch", net2branch, ("at",), branch_sites, _propose, probability=0.15))
