"""The channel rules for slices, split/chunk, channel shuffles and functional norms, on small modules and timm nets.

Each case widens (net2wider, ``check=True``) and permutes (``surgery.permute_channels``)
through the op and checks the output did not move; where a change cannot be exact, the
refusal is one line that names the op.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle

import growth
import surgery
from growth.check import output_change, vary_constant_weights
from growth.errors import GrowthError
from growth.graphedit import Workbench
from growth.wider import replication_map
from surgery.channels import ChannelAnalysis, analyze_channels
from surgery.channels.remap import remap_channels
from surgery.core.errors import SurgeryError

X = torch.randn(2, 3, 16, 16)


def _init(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            nn.init.normal_(p, std=0.5)
    return vary_constant_weights(model.eval(), torch.Generator().manual_seed(0))


def _kept(before: nn.Module, after: nn.Module, x: torch.Tensor = X) -> bool:
    return output_change(before, after, (x,)).within()


def _permuted(model: nn.Module, at: str, x: torch.Tensor = X) -> nn.Module:
    """``permute_channels`` at ``at`` with a random permutation that keeps the group's blocks."""
    group = analyze_channels(model, x).group_at(at)
    size = group.channels // group.blocks
    perm = [i for b in range(group.blocks) for i in (torch.randperm(size) + b * size).tolist()]
    return surgery.permute_channels(model, at, perm, example_input=x)


def _grow_group(model: nn.Module, x: torch.Tensor, pick: int, extra: int) -> nn.Module:
    """Widen by ``extra`` the group holding channel ``pick`` of the first conv's output (checked)."""
    work = Workbench(model, x)
    first = next(n for n in work.gm.graph.nodes if n.op == "call_module")
    layout = work.analysis.layout(first.name)
    start = 0
    for segment in layout.segments:
        if start <= pick < start + segment.size:
            group = work.analysis.groups[segment.group]
            break
        start += segment.size
    gen = torch.Generator().manual_seed(0)
    remap_channels(work.gm, work.analysis, {group.id: replication_map(group, group.channels + extra, gen)})
    return work.finish("grow_group", check=True)


# ----------------------------------------------------------------------------- slices


class Sliced(nn.Module):
    """A conv's channels sliced in two (4 | 6), each part read by its own conv, then added."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.left = nn.Conv2d(4, 6, 1)
        self.right = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(self.left(x[:, :4]) + self.right(x[:, 4:, :, :]))


class Ghost(nn.Module):
    """GhostNet's module: a primary conv, a cheap depthwise copy, ``cat(...)[:, :out]`` (odd ``out`` cuts a channel)."""

    def __init__(self, out: int) -> None:
        super().__init__()
        init = (out + 1) // 2
        self.out = out
        self.primary = nn.Sequential(nn.Conv2d(3, init, 1), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init), nn.BatchNorm2d(init))
        self.head = nn.Conv2d(out, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        x2 = self.cheap(x1)
        return self.head(torch.cat([x1, x2], dim=1)[:, : self.out, :, :])


def test_a_slice_splits_the_group_and_each_part_widens_exactly() -> None:
    net = _init(Sliced())
    a = analyze_channels(net, X)
    assert [s.channels for s in a.layout("relu").segments] == [4, 6]
    first, second = (a.groups[s.group] for s in a.layout("relu").segments)
    assert [c.target for c in first.consumers] == ["left"] and [c.target for c in second.consumers] == ["right"]
    assert {p.target for p in first.producers} == {"conv"} and {f.target for f in first.followers} == {"bn"}
    wide = growth.net2wider(net, ["getitem", "getitem_1"], factor=2.0, seed=0, example_input=X, check=True)
    assert wide.conv.out_channels == 20 and wide.left.in_channels == 8 and wide.right.in_channels == 12
    assert _kept(net, _permuted(net, "getitem_1"))
    with pytest.raises(GrowthError, match="net2wider does not apply at 'conv': its output joins 2 channel groups"):
        growth.net2wider(net, "conv", factor=1.5, example_input=X)


@pytest.mark.parametrize("out", [12, 11])
def test_ghost_slices_follow_the_widened_concatenation(out: int) -> None:
    net = _init(Ghost(out))
    if out % 2 == 0:  # the slice keeps the whole concatenation: the primary conv is a site, the bound is rewritten
        wide = growth.net2wider(net, "primary.0", factor=1.5, seed=0, example_input=X, check=True)
        assert wide.primary[0].out_channels == 9 and wide.head.in_channels == 18
        assert _kept(net, _permuted(net, "primary.0"))
    else:  # 11 = 6 + 5: the copy's last channel is cut off, so the primary conv writes two groups (5 | 1)
        layout = analyze_channels(net, X).layout("getitem")
        assert [s.channels for s in layout.segments] == [5, 1, 5]
        grown = _grow_group(net, X, 0, 3)
        assert grown.primary[0].out_channels == 9 and grown.head.in_channels == 17
        assert _kept(net, _grow_group(net, X, 5, 2))


# ----------------------------------------------------------------------------- split, chunk, cat


class Halves(nn.Module):
    """CSP-like: a conv split in two, one half through a residual block, the halves concatenated."""

    def __init__(self, chunk: bool) -> None:
        super().__init__()
        self.chunk = chunk
        self.expand = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.mixed = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(5, 5, 5, padding=2, groups=5)])
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(x)
        a, b = x.chunk(2, dim=1) if self.chunk else torch.split(x, 4, 1)
        x = torch.cat([a, b + self.block(b)], dim=1)
        parts = torch.split(x, [3, 5], dim=1)  # MixNet's mixed depthwise convs: cuts across the halves
        return self.head(torch.cat([conv(parts[i]) for i, conv in enumerate(self.mixed)], dim=1))


@pytest.mark.parametrize("chunk", [False, True])
def test_split_pieces_are_groups_and_widen_exactly(chunk: bool) -> None:
    net = _init(Halves(chunk))
    a = analyze_channels(net, X)
    assert [s.channels for s in a.layout("expand_2").segments] == [3, 1, 4]  # cut at 4 (halves) and 3 (mixed)
    residual = a.group_at("block.3")
    assert {p.target for p in residual.producers} == {"expand.0", "block.3"}
    assert {c.target for c in residual.consumers} == {"block.0", "head"}
    assert {f.target for f in residual.followers} >= {"expand.1", "mixed.1"}
    wide = growth.net2wider(net, "block.3", factor=2.0, seed=0, example_input=X, check=True)
    assert wide.expand[0].out_channels == 12 and wide.mixed[1].in_channels == 9 and wide.head.in_channels == 12
    assert _kept(net, _permuted(net, "block.3"))
    assert _kept(net, _grow_group(net, X, 0, 2))  # the first half, cut by the mixed split: 3 channels, then 1


# ----------------------------------------------------------------------------- channel shuffle


class Shuffled(nn.Module):
    """A conv, torchvision's ``channel_shuffle`` into 2 groups, a conv reading the shuffled channels."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.literal:  # the channel count written in the graph: replication cannot follow it
            b, _, h, w = x.shape
            x = x.view(b, 2, 4, h, w).transpose(1, 2).reshape(b, -1, h, w)
        else:
            x = channel_shuffle(x, 2)
        return self.head(x)


def test_channel_shuffles_couple_the_shuffled_parts() -> None:
    net = _init(Shuffled())
    a = analyze_channels(net, X)
    shuffled = a.layout("view_1")
    assert len(shuffled.segments) == 1 and shuffled.segments[0].channels == 4 and shuffled.segments[0].inner == 2
    wide = growth.net2wider(net, "view", factor=1.5, seed=0, example_input=X, check=True)
    assert wide.conv[0].out_channels == 12 and wide.head.in_channels == 12
    assert _kept(net, _permuted(net, "view"))
    literal = _init(Shuffled(literal=True))
    assert _kept(literal, _permuted(literal, "view"))
    with pytest.raises(GrowthError, match=r"'view' \(.view\(\)\) reshapes to a fixed count of 4 channels"):
        growth.net2wider(literal, "view", factor=1.5, example_input=X)


def test_shufflenet_blocks_what_it_cannot_follow() -> None:
    net = _init(surgery.build_model("shufflenet_v2_x0_5"))
    x = torch.randn(1, 3, 32, 32)
    a = analyze_channels(net, x)
    reasons = {g.obstacle(replicate=False) for g in a.groups.values()} - {None}
    assert any("splits these channels into 2 parts laid out differently" in r for r in reasons)
    wide = growth.net2wider(net, "stage2.1.branch2.0", factor=1.5, seed=0, example_input=x, check=True)
    assert wide.get_submodule("stage2.1.branch2.0").out_channels == 36


# ----------------------------------------------------------------------------- functional norms


class Norms(nn.Module):
    """Norm modules called as functions (as timm's norm-act layers do), and a GroupNorm module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.gn = nn.Conv2d(8, 8, 1), nn.GroupNorm(4, 8)
        self.conv3, self.inorm = nn.Conv2d(8, 8, 1), nn.GroupNorm(8, 8)
        self.conv4, self.gn_module = nn.Conv2d(8, 6, 1), nn.GroupNorm(6, 6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        x = F.batch_norm(self.conv1(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)
        x = F.group_norm(self.conv2(torch.relu(x)), 4, self.gn.weight, self.gn.bias)
        x = F.group_norm(self.conv3(torch.relu(x)), 8, self.inorm.weight, self.inorm.bias)
        return self.head(torch.relu(self.gn_module(self.conv4(x))))


def test_functional_batch_and_group_norms_follow_their_channels() -> None:
    net = _init(Norms())
    a = analyze_channels(net, X)
    followers = [(f.target, f.kind) for f in a.group_at("conv1").followers]
    assert followers == [("bn", "BatchNorm2d")]  # all its tensors belong to one norm module: that module follows
    wide = growth.net2wider(net, ["conv1", "conv3", "conv4"], factor=1.5, seed=0, example_input=X, check=True)
    assert wide.bn.running_var.shape == (12,) and wide.inorm.weight.shape == (12,) and wide.gn_module.num_groups == 9
    grouped = a.group_at("conv2")
    assert grouped.blocks == 4
    assert grouped.obstacle(replicate=True) == (
        "'group_norm' normalises groups of 2 channels together: replicating a channel changes its group's statistics"
    )
    with pytest.raises(GrowthError, match="^net2wider does not apply at 'conv2': 'group_norm' normalises groups"):
        growth.net2wider(net, "conv2", factor=1.5, example_input=X)
    assert _kept(net, _permuted(net, "conv2"))
    with pytest.raises(SurgeryError, match="perm must keep every channel in its block"):
        surgery.permute_channels(net, "conv2", [7, 1, 2, 3, 4, 5, 6, 0], example_input=X)


# ----------------------------------------------------------------------------- tokens


class Tokens(nn.Module):
    """A ViT in miniature: patches, a class token, position embeddings, self-attention, a layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos = nn.Parameter(torch.zeros(1, 17, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp, self.out, self.gamma = nn.Linear(8, 16), nn.Linear(16, 8), nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.out(torch.relu(self.mlp(x))) * self.gamma.reshape(1, 1, -1)
        return self.head(x[:, 0])


def test_token_streams_follow_class_tokens_attention_and_layer_scales() -> None:
    net = _init(Tokens())
    stream = analyze_channels(net, X).group_at("patch")
    assert {p.target for p in stream.producers} == {"patch", "attn", "out"}
    assert {c.target for c in stream.consumers} == {"attn", "mlp", "head"}
    assert {(f.target, f.dim) for f in stream.followers} == {("cls", 2), ("pos", 2), ("gamma", 0)}
    assert stream.obstacle(replicate=False) is None
    heads = "'attn' (MultiheadAttention) splits these channels into 2 heads"
    assert stream.obstacle(replicate=True) == heads
    assert stream.resize_obstacle() is None and stream.multiple == 2  # may shrink to a multiple of the heads
    assert _kept(net, _permuted(net, "patch"))
    growth.net2wider(net, "mlp", factor=2.0, seed=0, example_input=X, check=True)


# ----------------------------------------------------------------------------- timm


@functools.lru_cache(maxsize=1)
def _timm(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return vary_constant_weights(timm.create_model(name, pretrained=False).eval(), torch.Generator().manual_seed(0))


TIMM_SITES = {
    "ghostnet_100": [
        "blocks.1.0.ghost1.primary_conv.0",
        "blocks.3.0.ghost2.primary_conv.0",
        "blocks.4.0.se.conv_reduce",
    ],
    "mixnet_s": ["blocks.1.0.conv_pw.0", "blocks.3.0.conv_pwl.0", "blocks.4.0.conv_pwl.1"],
    "cspresnet50": ["stages.0.blocks.1.conv3.conv", "stages.1.conv_transition_b.conv", "stages.2.blocks.0.conv1.conv"],
    "resnetv2_50": ["stem.conv", "stages.0.blocks.0.conv3", "stages.2.blocks.1.conv2"],
}


@pytest.mark.parametrize("name", list(TIMM_SITES))
def test_timm_nets_widen_and_permute_through_their_blocks(name: str) -> None:
    net = _timm(name)
    x = torch.randn(1, 3, 32, 32)
    analysis: ChannelAnalysis = analyze_channels(net, x)
    unfollowed = {r for g in analysis.groups.values() for r in g.blockers if "does not follow" in r}
    assert not unfollowed
    growth.net2wider(net, TIMM_SITES[name], factor=1.5, seed=0, example_input=x, check=True)
    assert _kept(net, _permuted(net, TIMM_SITES[name][0], x), x)
    with pytest.raises(GrowthError, match="reaches the model output") as refused:
        growth.net2wider(net, net.pretrained_cfg["classifier"], factor=1.5, example_input=x)
    assert "\n" not in str(refused.value)
