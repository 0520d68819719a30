"""growth.deeper (net2deeper): the new layers start as the identity, their BatchNorm too, in eval and in training."""

from __future__ import annotations

import torch
from torch import nn

import growth
import surgery


def test_identity_layers_start_as_identity(resnet18: nn.Module) -> None:
    deep = growth.net2deeper(resnet18, "layer1", groups=4, kernel_size=3)
    conv, bn, _ = deep.get_submodule("layer1.net2deeper0")
    weight = conv.weight.detach()
    assert weight.shape == (64, 16, 3, 3) and int(weight.sum()) == 64
    assert torch.equal(weight[:, :, 1, 1][torch.arange(64), torch.arange(64) % 16], torch.ones(64))
    # the BatchNorm holds the statistics of the value it follows and undoes them
    value = surgery.cut(resnet18.eval(), "layer1")[0](growth.graphedit.default_inputs(resnet18).args[0])
    assert torch.allclose(bn.running_mean, value.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.weight, torch.sqrt(value.var((0, 2, 3), unbiased=False) + bn.eps), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(bn.eval()(value), value, atol=1e-5)
        trained = bn.train()(value)  # batch statistics of the same value: still the identity
        assert torch.allclose(trained, value, atol=1e-4)


def test_a_new_residual_block_after_a_downsampling_block_keeps_the_function_exactly() -> None:
    torch.manual_seed(0)
    net = surgery.refs.load("growth.models:resnet(layers=[1, 1, 1, 1], width=8)", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    assert "layer2.0" not in growth.sites(net, "net2deeper", kind="block")  # it changes the shape: no copy
    deep = growth.net2deeper(net, "layer2", kind="residual", check=True).eval()
    assert torch.equal(deep(x), net(x))
    block = deep.get_submodule("layer2.net2deeper0")  # conv-bn-relu-conv-bn, the last BatchNorm at zero
    assert [type(m).__name__ for m in block] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
    assert block[4].weight.abs().sum() == 0 and block[4].bias.abs().sum() == 0
    again = growth.net2deeper(net, "layer2", kind="residual").eval()  # seeded by its site: replays exactly
    assert all(torch.equal(a, b) for a, b in zip(deep.state_dict().values(), again.state_dict().values()))
    with torch.no_grad():
        block[4].weight.fill_(1.0)  # the branch is live once its last BatchNorm is
    assert not torch.allclose(deep(x), net(x))


def test_stages_grows_a_resnet10_into_a_resnet18_shape() -> None:
    resnet10 = surgery.refs.load("growth.models:resnet(layers=[1, 1, 1, 1], width=8)", num_classes=10).eval()
    resnet18 = surgery.refs.load("growth.models:resnet(layers=[2, 2, 2, 2], width=8)", num_classes=10)
    steps = growth.expand(resnet10, "net2deeper", "stages")
    assert [r.args["kind"] for r in steps] == ["block", "residual", "residual", "residual"]
    grown = growth.grow_steps(resnet10, steps).eval()
    assert surgery.count_params(grown) == surgery.count_params(resnet18)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(grown(x), resnet10(x))
    assert [r.args["kind"] for r in growth.expand(resnet18, "net2deeper", "stages")] == ["block"] * 4
