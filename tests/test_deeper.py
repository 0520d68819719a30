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
