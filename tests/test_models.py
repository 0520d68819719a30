"""surgery.models.build: an unknown model name is refused in one line that lists the closest known names;
growth.models' builders grow as the growth bench needs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import growth
import surgery


def test_unknown_model_lists_closest() -> None:
    with pytest.raises(surgery.SurgeryError, match="closest: resnet18"):
        surgery.build_model("resnet81")


# --- growth.models: the CIFAR ResNet and VGG-8 that bench/growth_training.py grows ------------------------------


def _built(source: str, **kwargs: Any) -> torch.nn.Module:
    """A builder's net in eval mode with non-trivial BatchNorm scales and statistics (seeded)."""
    net = surgery.build_model(source, **kwargs)
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.get_buffer("running_mean"), -0.5, 0.5)
    return net.eval()


def _grow(net: torch.nn.Module, op: str, where: str, **args: Any) -> torch.nn.Module:
    """``net`` grown by the steps ``growth.expand`` gives, in eval mode."""
    steps = growth.expand(net.eval(), op, where, example_input=X, **args)
    return growth.grow_steps(net, steps, X).eval()


def _params(net: torch.nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in net.parameters())


X = torch.randn(2, 3, 32, 32)


def test_resnet_wider_is_the_wider_builder() -> None:
    """net2wider x2 of every group turns resnet(width=4) into resnet(width=8)'s shapes, same function."""
    half = _built("growth.models:resnet", width=4)
    wide = _grow(half, "net2wider", "all", factor=2)
    assert _params(wide) == _params(surgery.build_model("growth.models:resnet", width=8))
    with torch.no_grad():
        assert torch.allclose(wide(X), half(X), rtol=0, atol=1e-5 * half(X).abs().max().item())


def test_resnet18_stages_adds_a_zero_branch_block_per_stage() -> None:
    net = _built("growth.models:resnet", layers=[2, 2, 2, 2], width=4)
    deep = _grow(net, "net2deeper", "stages")
    assert [len(getattr(deep, f"layer{i}")) for i in range(1, 5)] == [3, 3, 3, 3]
    assert deep.get_parameter("layer2.net2deeper0.bn2.weight").abs().sum().item() == 0.0
    with torch.no_grad():
        assert torch.allclose(deep(X), net(X), rtol=0, atol=1e-5 * net(X).abs().max().item())


def test_vgg8_grows_deeper_and_wider_in_either_order_to_one_shape() -> None:
    vgg = _built("growth.models:vgg8", width=4, hidden=16)
    deeper_wider = _grow(_grow(vgg, "net2deeper", "stages"), "net2wider", "all", factor=2)
    wider_deeper = _grow(_grow(vgg, "net2wider", "all", factor=2), "net2deeper", "stages")
    assert _params(deeper_wider) == _params(wider_deeper)
    convs = [m for m in deeper_wider.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 + 3 and convs[0].out_channels == 8  # an identity conv per stage (none after the last pool)
    with torch.no_grad():
        for grown in (deeper_wider, wider_deeper):
            assert torch.allclose(grown(X), vgg(X), rtol=0, atol=1e-5 * vgg(X).abs().max().item())


def test_resnet10_stages_grows_to_resnet18_shape() -> None:
    """One block per stage (stages 2-4 downsample) -> two per stage, ResNet-18's shapes, same function."""
    net = _built("growth.models:resnet", layers=[1, 1, 1, 1], width=4)
    deep = _grow(net, "net2deeper", "stages")
    assert _params(deep) == _params(surgery.build_model("growth.models:resnet", layers=[2, 2, 2, 2], width=4))
    with torch.no_grad():
        assert torch.allclose(deep(X), net(X), rtol=0, atol=1e-5 * net(X).abs().max().item())
