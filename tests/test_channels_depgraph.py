"""Where the channel analysis and Torch-Pruning's DepGraph disagree (``bench/depgraph_agreement.py``), DepGraph errs.

Every remaining disagreement comes from one DepGraph behaviour: it pairs the pieces of a
``torch.split`` (``Tensor.split``/``chunk``) with the ops that read them in the order it
meets those ops in the autograd graph, not by piece index, so channel 0 of a layer whose
output is split is sent to the reader of another piece (and the readers of the first
piece are missed, or the readers of other pieces added). That hits MixNet's mixed convs,
the CSP stages' ``xs, xb = x.split(...)`` and Res2Net's ``torch.split(out, width, 1)``.

For each such model, the library's grouping is shown to be the right one: its coupled
layers for a few of those layers (DepGraph's answer in the comment), and then widening
the group of channel 0 of *every* Conv2d/Linear at once, along the library's grouping,
keeps the function (``check=True``). A missing reader would make the grown network fail
to run; a layer wrongly left out of a group would change the output. No torch-pruning is
needed here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from growth.check import vary_constant_weights
from growth.graphedit import Workbench
from growth.wider import replication_map
from surgery.channels import ChannelAnalysis, ChannelGroup
from surgery.channels.remap import remap_channels

timm = pytest.importorskip("timm")
X = torch.randn(1, 3, 32, 32)
KINDS = {"Conv2d", "Linear"}

# layer -> the Conv2d/Linear coupled to its output channel 0 (DepGraph's answer differs as noted)
COUPLED = {
    "mixnet_s": {
        # DepGraph: blocks.1.0.conv_pw.1 instead of .0
        "blocks.0.0.conv_pw": {"conv_stem", "blocks.0.0.conv_dw", "blocks.0.0.conv_pw", "blocks.1.0.conv_pw.0"},
        # DepGraph: blocks.1.0.conv_pwl.1 instead of .0
        "blocks.1.0.conv_pw.0": {"blocks.1.0.conv_pw.0", "blocks.1.0.conv_dw", "blocks.1.0.conv_pwl.0"},
        # three depthwise pieces (80 | 80 | 80) read by two pointwise ones (120 | 120); DepGraph: conv_pwl.1
        "blocks.3.0.conv_dw.1": {
            "blocks.3.0.conv_pw",
            "blocks.3.0.conv_dw.1",
            "blocks.3.0.se.conv_reduce",
            "blocks.3.0.se.conv_expand",
            "blocks.3.0.conv_pwl.0",
        },
    },
    "cspresnet50": {
        # DepGraph adds stages.0.conv_transition_b.conv, which writes the other half of the concatenation
        "stages.0.conv_exp.conv": {"stages.0.conv_exp.conv", "stages.0.conv_transition.conv"},
        # DepGraph misses stages.0.blocks.0.conv1.conv, the first reader of the split's second half
        "stages.0.blocks.0.conv3.conv": {
            "stages.0.conv_exp.conv",
            "stages.0.conv_transition_b.conv",
            *(f"stages.0.blocks.{i}.conv{j}.conv" for i in range(3) for j in (1, 3)),
        },
    },
    "cspdarknet53": {
        "stages.0.conv_exp.conv": {"stages.0.conv_exp.conv", "stages.0.conv_transition.conv"},
        # DepGraph misses stages.1.blocks.0.conv1.conv
        "stages.1.blocks.0.conv2.conv": {
            "stages.1.conv_exp.conv",
            "stages.1.conv_transition_b.conv",
            *(f"stages.1.blocks.{i}.conv{j}.conv" for i in range(2) for j in (1, 2)),
        },
    },
    "res2net50_14w_8s": {
        # DepGraph: layer1.0.conv3 (the reader of the last piece) instead of layer1.0.convs.0
        "layer1.0.conv1": {"layer1.0.conv1", "layer1.0.convs.0"},
        # DepGraph adds layer1.1.conv3 and layer1.1.convs.1 to .6
        "layer1.1.conv1": {"layer1.1.conv1", "layer1.1.convs.0"},
        # convs.0's output is added to piece 1 (read by convs.1) and concatenated into conv3; DepGraph adds convs.2-6
        "layer1.1.convs.0": {"layer1.1.conv1", "layer1.1.convs.0", "layer1.1.convs.1", "layer1.1.conv3"},
    },
}


def _channel0_groups(analysis: ChannelAnalysis) -> dict[str, int]:
    """Every Conv2d/Linear (producer or depthwise follower) -> the group of channel 0 of its output."""
    found: dict[str, int] = {}
    for group in analysis.groups.values():
        for ep in (*group.producers, *group.followers):
            if ep.kind in KINDS and ep.target not in found:
                found[ep.target] = analysis.layout(ep.node).segments[0].group
    return found


def _wider(group: ChannelGroup) -> int:
    """A quarter more channels (at least one per block of the grouped convs reading them)."""
    return group.channels + group.blocks * max(1, group.channels // group.blocks // 4)


@pytest.mark.parametrize("name", list(COUPLED))
def test_growing_along_the_library_grouping_keeps_the_function(name: str) -> None:
    torch.manual_seed(0)
    model: nn.Module = timm.create_model(name, pretrained=False).eval()
    vary_constant_weights(model, torch.Generator().manual_seed(0))
    work = Workbench(model, X)
    analysis = work.analysis
    channel0 = _channel0_groups(analysis)
    for layer, expected in COUPLED[name].items():
        group = analysis.groups[channel0[layer]]
        coupled = {ep.target for ep in (*group.producers, *group.followers, *group.consumers) if ep.kind in KINDS}
        assert coupled == expected, layer
    growable = {g for g in channel0.values() if analysis.groups[g].obstacle(replicate=True) is None}
    blocked = {layer for layer, g in channel0.items() if g not in growable}
    assert all("model output" in analysis.groups[channel0[layer]].obstacle(replicate=True) for layer in blocked)
    gen = torch.Generator().manual_seed(0)
    maps = {g: replication_map(analysis.groups[g], _wider(analysis.groups[g]), gen) for g in growable}
    remap_channels(work.gm, analysis, maps)
    grown = work.finish("widen_every_channel0_group", check=True)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in model.parameters())
