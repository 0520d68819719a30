"""surgery.channels.slim: one set of weights at any width, exact against the extracted network, on real families."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import surgery
from surgery.channels.slim import kept_channels, make_divisible
from surgery.core.errors import SurgeryError

FAMILIES = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "timm:convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=10),
}


def _randomise_statistics(net: torch.nn.Module) -> torch.nn.Module:
    """Fresh BatchNorms hold zeros and ones: give them values a wrong slice would show."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_width_runs_exact_and_costs_between_w2_and_w(name: str) -> None:
    net = _randomise_statistics(FAMILIES[name]()).eval()
    x = torch.randn(2, 3, 64, 64)
    view = surgery.slim(net, example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(view(x), net(x))  # width 1.0 is the model itself
        full = surgery.count_flops(net, x)
        for width in (0.25, 0.5, 0.75):
            view.width = width
            small = view.extract().eval()
            assert torch.equal(view(x), small(x))
            assert small(x).shape == (2, 10)  # the classifier's output is never slimmed
            ratio = surgery.count_flops(small, x) / full
            assert 0.8 * width**2 <= ratio <= width, (width, ratio)


def test_weights_are_shared_and_training_a_width_trains_them() -> None:
    net = torchvision.models.resnet18(num_classes=10)
    view = surgery.slim(net, 0.5)
    assert view.model.layer1[0].conv1.weight is net.layer1[0].conv1.weight
    assert sum(p.numel() for p in view.parameters()) == sum(p.numel() for p in net.parameters())
    before = net.layer1[0].conv1.weight.detach().clone()
    view(torch.randn(4, 3, 32, 32)).sum().backward()
    grad = net.layer1[0].conv1.weight.grad
    assert grad is not None
    assert grad[:32, :32].abs().sum() > 0 and torch.equal(grad[32:], torch.zeros_like(grad[32:]))  # kept rows only
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert not torch.equal(before, net.layer1[0].conv1.weight)


def test_grouped_convs_keep_their_groups() -> None:
    net = torchvision.models.resnext50_32x4d(num_classes=10).eval()
    small = surgery.slim(net, 0.5).extract()
    conv = small.layer1[0].conv2
    assert conv.groups == 32 and conv.in_channels == conv.out_channels == 64
    assert small(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_transformer_mlp_slims_and_fixed_head_width_is_listed() -> None:
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    view = surgery.slim(net, 0.5, example_input=x).eval()
    small = view.extract().eval()
    assert small.blocks[0].mlp.fc1.out_features == 384
    assert torch.equal(view(x), small(x))
    assert view.skipped and all("(" in line and ":" in line for line in view.skipped)


def test_multihead_attention_slims_with_its_stream() -> None:
    net = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    ).eval()
    torch.nn.init.normal_(net.heads.head.weight)  # a zero head would hide every difference
    x = torch.randn(2, 3, 32, 32)
    view = surgery.slim(net, 0.5, example_input=x).eval()
    small = view.extract().eval()
    attention = small.encoder.layers[0].self_attention
    assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (32, 4, 8)
    assert torch.equal(view(x), small(x))
    assert surgery.count_flops(small, x) / surgery.count_flops(net, x) <= 0.35


def test_windowed_attention_and_patch_merging_slim_in_swin() -> None:
    net = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=[2, 2], num_classes=10
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    view = surgery.slim(net, 0.5, example_input=x).eval()
    small = view.extract().eval()
    attention = small.features[3][0].attn  # the second stage, after a patch merging
    assert attention.qkv.weight.shape == (3 * 16, 16) and attention.proj.weight.shape == (16, 16)
    assert torch.equal(view(x), small(x))
    assert surgery.count_flops(small, x) / surgery.count_flops(net, x) <= 0.35


def test_batchnorm_statistics_per_width_and_resolution() -> None:
    net = torchvision.models.resnet18(num_classes=10)
    view = surgery.slim(net, 0.5)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    surgery.recalibrate_bn(view, batches)
    assert (0.5, (32, 32)) in view.bn_stats
    view.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        calibrated, other_res = view(x), view(torch.randn(2, 3, 48, 48))
        small = view.extract(resolution=(32, 32)).eval()
        assert torch.equal(calibrated, small(x))  # the extracted network carries the statistics
        assert not torch.equal(view.extract()(x), calibrated)  # without them: the full network's, sliced
    assert other_res.shape == (2, 10)
    mean = small.bn1.running_mean
    assert torch.equal(view.bn_stats[(0.5, (32, 32))]["bn1.running_mean"], mean)


def test_channel_rounding() -> None:
    assert make_divisible(12, 8) == 16 and make_divisible(3, 8) == 8 and make_divisible(36, 8) == 40
    assert kept_channels(64, 0.25) == 16 and kept_channels(64, 1.0) == 64
    assert kept_channels(16, 0.25) == 8  # at least one divisor's worth
    assert kept_channels(6, 0.5) == 3  # not a multiple of the divisor: rounded to one channel
    assert kept_channels(128, 0.5, blocks=32) == 64
    assert kept_channels(104, 0.5, blocks=13) == 52  # 13 blocks and a divisor of 8: rounds to blocks
    assert kept_channels(10, 0.5, divisor=1) == 5


@pytest.mark.parametrize("width", [0.0, -0.5, 1.5])
def test_width_outside_unit_interval_is_one_line(width: float) -> None:
    view = surgery.slim(torchvision.models.resnet18(num_classes=10))
    with pytest.raises(SurgeryError, match=r"outside \(0, 1\]"):
        view.width = width


def test_model_without_slimmable_group_is_refused() -> None:
    with pytest.raises(SurgeryError, match="no channel group whose width can change"):
        surgery.slim(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)))


def test_extracted_network_saves_and_loads(tmp_path) -> None:
    net = surgery.build_model("resnet18", num_classes=10).eval()  # a recipe: saved without pickles
    small = surgery.slim(net, 0.25).extract().eval()
    surgery.save(small, tmp_path / "small")
    back = surgery.load(tmp_path / "small").eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(back(x), small(x))


def test_widths_share_plans_and_plans_index_per_dim() -> None:
    view = surgery.slim(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 16, 16)
    widths = torch.linspace(0.25, 0.5, 60).tolist()  # a training run draws widths like these
    with torch.no_grad():
        for width in widths:
            view.width = width
            view(x)
    plans = view._plans.values()
    assert len(plans) == len({tuple(view.channels(w).values()) for w in widths}) < 60  # one per channel counts
    assert all(isinstance(selection, list) for plan in plans for selection in plan.index.values())
