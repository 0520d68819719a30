"""Small networks to grow from, buildable from a recipe (``surgery.build_model("growth.models:small_vgg")``).

>>> import torch, surgery
>>> net = surgery.build_model("growth.models:small_vgg", widths=[16, 32], num_classes=10)
>>> net(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
>>> [name for name, _ in net.named_children()]
['features', 'flatten', 'classifier']

:func:`resnet` (a CIFAR ResNet of torchvision's BasicBlocks) and :func:`vgg8` (the growth notes' VGG-8)
are the nets :file:`bench/growth_training.py` grows while training.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from surgery.core.trust import model_builder


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias), BatchNorm, ReLU."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(inplace=True),
        )
    )


@model_builder
def small_vgg(widths: Sequence[int] = (32, 64, 128), num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """A VGG-like net: one conv-bn-relu block and a 2x2 max-pool per width, then flatten and a Linear.

    ``features.<i>.block`` is stage ``i``'s block and ``features.<i>.pool`` its pool; the
    classifier reads ``widths[-1] * (image_size / 2**len(widths))**2`` features.
    """
    stages, channels = [], 3
    for width in widths:
        stages.append(nn.Sequential(OrderedDict(block=conv_bn_relu(channels, width), pool=nn.MaxPool2d(2))))
        channels = width
    side = image_size // 2 ** len(widths)
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*stages),
            flatten=nn.Flatten(),
            classifier=nn.Linear(channels * side * side, num_classes),
        )
    )


def _stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks of ``width`` channels, the first one striding (1x1 conv + BN shortcut when needed)."""
    downsample = None
    if stride != 1 or in_channels != width:
        downsample = nn.Sequential(nn.Conv2d(in_channels, width, 1, stride, bias=False), nn.BatchNorm2d(width))
    layers = [BasicBlock(in_channels, width, stride, downsample)]
    layers += [BasicBlock(width, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """torchvision's ResNet layout with the CIFAR stem (3x3 stride-1 ``conv1``, Identity ``maxpool``), any stages."""

    def __init__(self, layers: Sequence[int], width: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.stages = len(layers)
        channels = width
        for i, blocks in enumerate(layers):
            self.add_module(f"layer{i + 1}", _stage(channels, width * 2**i, blocks, 1 if i == 0 else 2))
            channels = width * 2**i
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@model_builder
def resnet(layers: Sequence[int] = (2, 2, 2, 2), width: int = 64, num_classes: int = 10) -> CifarResNet:
    """A CIFAR ResNet of torchvision's BasicBlocks: ``layers[i]`` blocks of ``width * 2**i`` channels in stage ``i``.

    The CIFAR stem is built in: ``conv1`` is a 3x3 stride-1 conv and ``maxpool`` an Identity (xross's
    ``stem="cifar"`` gives the same shapes; it is not needed). Module names are torchvision's (``conv1``,
    ``bn1``, ``relu``, ``maxpool``, ``layer1``.., ``avgpool``, ``fc``), so growth's sites read alike:
    ResNet-18 is ``layers=[2, 2, 2, 2], width=64``, ResNet-10 ``layers=[1, 1, 1, 1]``.

    >>> import torch, surgery
    >>> net = surgery.build_model("growth.models:resnet", layers=[1, 1, 1, 1], width=8)
    >>> net(torch.randn(2, 3, 32, 32)).shape, net.layer4[0].conv2.out_channels
    (torch.Size([2, 10]), 64)
    """
    return CifarResNet(layers, width, num_classes)


@model_builder
def vgg8(width: int = 64, hidden: int = 256, num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """The growth notes' VGG-8: six 3x3 conv-bn-relu (two per stage, ``width``, ``2*width``, ``4*width``
    channels, a 2x2 max-pool after each stage) and two Linear layers (``hidden`` units, ReLU): 8 weight layers.

    ``features.<i>.conv<j>`` is stage ``i``'s ``j``-th block (``j`` = 0, 1), ``features.<i>.pool`` its pool.

    >>> import torch, surgery
    >>> net = surgery.build_model("growth.models:vgg8", width=8, hidden=32)
    >>> layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    >>> net(torch.randn(2, 3, 32, 32)).shape, len(layers)
    (torch.Size([2, 10]), 8)
    """
    stages, channels = [], 3
    for i in range(3):
        out = width * 2**i
        blocks = OrderedDict(conv0=conv_bn_relu(channels, out), conv1=conv_bn_relu(out, out), pool=nn.MaxPool2d(2))
        stages.append(nn.Sequential(blocks))
        channels = out
    side = image_size // 8
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*stages),
            flatten=nn.Flatten(),
            fc=nn.Linear(channels * side * side, hidden),
            relu=nn.ReLU(inplace=True),
            classifier=nn.Linear(hidden, num_classes),
        )
    )
