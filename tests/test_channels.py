"""surgery.channels: the channel-coupling analysis on real graphs.

Who writes, follows and reads each channel group, and what blocks permuting or widening it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from surgery.channels import Segment, analyze_channels


@pytest.fixture(scope="module")
def analyses() -> dict[str, object]:
    return {}


def _analysis(name: str, cache: dict[str, object]):
    if name not in cache:
        cache[name] = analyze_channels(surgery.build_model(name))
    return cache[name]


def _targets(endpoints) -> list[str]:
    return [e.target for e in endpoints]


def test_resnet_stream_group(analyses) -> None:
    a = _analysis("resnet18", analyses)
    g = a.group_at("layer2")
    assert _targets(g.producers) == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    assert _targets(g.followers) == ["layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2"]
    assert _targets(g.consumers) == ["layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"]
    assert g.channels == 128 and g.blocks == 1 and g.obstacle(replicate=True) is None
    assert a.group_at("layer2.0.conv2") is g and a.group_at("layer2.1.conv2") is g


def test_squeeze_excitation_couples_the_scale_with_the_features(analyses) -> None:
    g = _analysis("efficientnet_b0", analyses).group_at("features.2.0.block.0.0")
    assert _targets(g.producers) == ["features.2.0.block.0.0", "features.2.0.block.2.fc2"]
    assert _targets(g.followers) == ["features.2.0.block.0.1", "features.2.0.block.1.0", "features.2.0.block.1.1"]
    assert _targets(g.consumers) == ["features.2.0.block.2.fc1", "features.2.0.block.3.0"]


def test_concatenations_place_groups_at_offsets(analyses) -> None:
    a = _analysis("densenet121", analyses)
    g = a.group_at("features.denseblock1.denselayer2.conv2")
    layout = a.layout("features_denseblock1_denselayer3_norm1")
    assert [s.channels for s in layout.segments] == [64, 32, 32]
    assert layout.segments[2] == Segment(g.id, 32)
    assert "features.transition1.conv" in _targets(g.consumers)
    assert "features.denseblock1.denselayer6.norm1" in _targets(g.followers)


def test_flatten_into_a_linear_spreads_each_channel(analyses) -> None:
    a = _analysis("vgg11_bn", analyses)
    layout = a.layout("flatten")
    assert layout.dim == 1 and layout.segments == (Segment(a.group_at("features.25").id, 512, 49),)
    assert "classifier.0" in _targets(a.group_at("features.25").consumers)


def test_layer_norms_allow_permutation_and_uniform_replication(analyses) -> None:
    a = _analysis("convnext_tiny", analyses)
    stream = a.group_at("features.1")
    assert stream.obstacle(replicate=False) is None and stream.obstacle(replicate=True) is None
    assert any("normalises over these channels" in reason for reason in stream.uniform)  # integer factors only
    kinds = {e.kind for e in stream.followers}
    assert {"Conv2d", "LayerNorm", "parameter"} <= kinds  # depthwise convs, the block norms, layer_scale
    assert a.group_at("features.1.0.block.3").obstacle(replicate=True) is None


def test_grouped_convs_and_shuffles(analyses) -> None:
    assert _analysis("resnext50_32x4d", analyses).group_at("layer1.0.conv1").blocks == 32
    shuffle = _analysis("shufflenet_v2_x0_5", analyses)
    with pytest.raises(surgery.SurgeryError, match="holds several channel groups"):  # the next block chunks it
        shuffle.group_at("stage2.0.branch1.2")
    reasons = [g.obstacle(replicate=False) or "" for g in shuffle.groups.values()]
    assert any("splits these channels into 2 parts laid out differently" in r for r in reasons)
    assert shuffle.group_at("stage2.1.branch2.0").obstacle(replicate=True) is None


def test_what_cannot_be_followed_is_named(analyses) -> None:
    vit = _analysis("vit_b_16", analyses)
    stream = vit.group_at("conv_proj")  # the class token's cat is followed: the stream can be permuted
    assert stream.obstacle(replicate=False) is None and "heads" in stream.obstacle(replicate=True)
    assert vit.group_at("encoder.layers.encoder_layer_0.mlp.0").obstacle(replicate=True) is None
    assert vit.shapes.input_shapes == ((2, 3, 224, 224),)
    r18 = _analysis("resnet18", analyses)
    assert r18.group_at("fc").obstacle(replicate=False) == "reaches the model output (node 'output')"
    assert "model input" in r18.groups[r18.layout("x").segments[0].group].obstacle(replicate=False)


def test_shared_layers_and_untracked_values_block() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.stem = nn.Conv2d(3, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(self.stem(x))).mean()

    a = analyze_channels(Shared())
    assert "called 2 times with shared weights" in a.group_at("stem").obstacle(replicate=False)
    with pytest.raises(surgery.SurgeryError, match="cannot run"):
        analyze_channels(nn.Sequential(nn.Conv2d(5, 4, 3), nn.Flatten(), nn.Linear(7, 2)))
