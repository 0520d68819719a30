"""Small networks to grow from, buildable from a recipe (``surgery.build_model("growth.models:small_vgg")``).

>>> import torch, surgery
>>> net = surgery.build_model("growth.models:small_vgg", widths=[16, 32], num_classes=10)
>>> net(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
>>> [name for name, _ in net.named_children()]
['features', 'flatten', 'classifier']
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

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
