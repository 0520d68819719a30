"""surgery.remap (surgery.permute_channels): every producer and consumer of a boundary moves together.

The output does not change.
"""

from __future__ import annotations

import copy

import pytest
import torch

import surgery
from growth.check import vary_constant_weights
from surgery.channels import analyze_channels


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    return vary_constant_weights(surgery.build_model("resnet18").eval())


@pytest.fixture(scope="module")
def mobilenet_v2() -> torch.nn.Module:
    return vary_constant_weights(surgery.build_model("mobilenet_v2").eval())


def test_resnet18_layer2_stream_permutes_every_writer_and_reader(resnet18: torch.nn.Module) -> None:
    before = copy.deepcopy(resnet18.state_dict())
    perm = torch.randperm(128).tolist()
    moved = surgery.permute_channels(resnet18, "layer2", perm).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _close(moved(x), resnet18(x))
    old, new = resnet18.state_dict(), moved.state_dict()
    writers = ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    norms = ["layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2"]
    readers = ["layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"]
    for name in writers:
        assert torch.equal(new[f"{name}.weight"], old[f"{name}.weight"][perm])
    for name in norms:
        for field in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(new[f"{name}.{field}"], old[f"{name}.{field}"][perm])
    for name in readers:
        assert torch.equal(new[f"{name}.weight"], old[f"{name}.weight"][:, perm])
    # layers outside the stream are untouched (layer2.0.conv1 reads layer1's stream, writes its own group)
    for name in ("layer2.0.conv1.weight", "layer2.1.bn1.weight", "layer3.0.conv2.weight"):
        assert torch.equal(new[name], old[name])
    assert all(torch.equal(v, before[k]) for k, v in resnet18.state_dict().items()), "the input model changed"


@pytest.mark.parametrize("at", ["features.3", "features.5.conv.0", "features.6.conv.1.0", "add_7"])
def test_mobilenet_v2_points(mobilenet_v2: torch.nn.Module, at: str) -> None:
    group = analyze_channels(mobilenet_v2).group_at(at)
    perm = torch.randperm(group.channels).tolist()
    moved = surgery.permute_channels(mobilenet_v2, at, perm).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _close(moved(x), mobilenet_v2(x))
    assert moved.state_dict().keys() == mobilenet_v2.state_dict().keys()


def test_mobilenet_v2_features3_output_couples_the_residual(mobilenet_v2: torch.nn.Module) -> None:
    group = analyze_channels(mobilenet_v2).group_at("features.3")
    assert [p.target for p in group.producers] == ["features.2.conv.2", "features.3.conv.2"]
    assert [c.target for c in group.consumers] == ["features.3.conv.0.0", "features.4.conv.0.0"]
    perm = torch.randperm(24).tolist()
    moved = surgery.permute_channels(mobilenet_v2, "features.3", perm)
    assert torch.equal(moved.features[2].conv[2].weight, mobilenet_v2.features[2].conv[2].weight[perm])
    assert torch.equal(moved.features[4].conv[0][0].weight, mobilenet_v2.features[4].conv[0][0].weight[:, perm])


def test_grouped_and_normalised_channels_permute_exactly() -> None:
    for name, at in [("resnext50_32x4d", "layer1.0.conv1"), ("convnext_tiny", "features.1")]:
        net = vary_constant_weights(surgery.build_model(name).eval())
        group = analyze_channels(net).group_at(at)
        size = group.channels // group.blocks
        perm = torch.cat([torch.randperm(size) + k * size for k in range(group.blocks)]).tolist()
        moved = surgery.permute_channels(net, at, perm).eval()
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert _close(moved(x), net(x)), name


def test_bad_permutations_are_refused(resnet18: torch.nn.Module) -> None:
    with pytest.raises(surgery.SurgeryError, match="perm has 5 entries but 'layer2' has 128 channels"):
        surgery.permute_channels(resnet18, "layer2", list(range(5)))
    with pytest.raises(surgery.SurgeryError, match="each of 0..127 exactly once"):
        surgery.permute_channels(resnet18, "layer2", [0] * 128)
    with pytest.raises(surgery.SurgeryError, match="reaches the model output"):
        surgery.permute_channels(resnet18, "fc", list(range(1000)))
    with pytest.raises(surgery.SurgeryError, match="closest: layer2"):
        surgery.permute_channels(resnet18, "layer22", list(range(128)))
    resnext = surgery.build_model("resnext50_32x4d")
    with pytest.raises(surgery.SurgeryError, match="keep every channel in its block"):
        surgery.permute_channels(resnext, "layer1.0.conv1", list(reversed(range(128))))


def test_permuted_model_saves_loads_and_cuts(resnet18: torch.nn.Module, tmp_path) -> None:
    moved = surgery.permute_channels(resnet18, "layer2", torch.randperm(128).tolist()).eval()
    surgery.save(moved, tmp_path / "m")
    again = surgery.load(tmp_path / "m").eval()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), moved.state_dict().values()))
    x = torch.randn(1, 3, 64, 64)
    pieces = surgery.cut(again, "layer2")
    with torch.no_grad():
        assert torch.equal(pieces(x), again(x))
        assert torch.equal(again(x), moved(x))
