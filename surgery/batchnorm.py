"""Re-estimate BatchNorm statistics from data (US-Nets' post-training calibration).

A network trained at several widths or resolutions shares its weights between them,
but the mean and variance a BatchNorm layer sees differ for each: running averages
collected during training fit none of them. :func:`recalibrate_bn` resets every
BatchNorm's running statistics and re-estimates them as the *cumulative* average of the
batch statistics over the given batches (``momentum=None``), with everything else in
eval mode (dropout off) and no gradients.

>>> import torch, torchvision, surgery
>>> net = torchvision.models.resnet18(num_classes=10)
>>> batches = [torch.randn(8, 3, 32, 32) for _ in range(4)]
>>> net = surgery.recalibrate_bn(net, batches).eval()
>>> int(net.bn1.num_batches_tracked)
4
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError

BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[BatchNorm]:
    """Every BatchNorm layer of ``model`` that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, BatchNorm) and m.track_running_stats]


def _images(batch: Any) -> Any:
    """The input of a batch given as ``images`` or ``(images, labels)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None) -> nn.Module:
    """Reset and re-estimate the running statistics of every BatchNorm in ``model``; returns ``model``.

    Args:
        model: any module; a module with its own ``recalibrate_bn(batches, num_batches)``
            method (a :class:`surgery.slim.SlimNet`) is calibrated by that method instead.
        batches: input tensors, or ``(inputs, labels)`` pairs, on the model's device.
        num_batches: use at most this many batches (default: all).

    The model's train/eval mode and every BatchNorm's momentum are restored afterwards.
    """
    own = getattr(model, "recalibrate_bn", None)
    if callable(own):
        own(batches, num_batches)
        return model
    layers = batchnorm_layers(model)
    if not layers:
        raise SurgeryError(f"{type(model).__name__} has no BatchNorm layer with running statistics to recalibrate")
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in layers}
    used = 0
    try:
        model.eval()
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches seen
            bn.train()
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            model(_images(batch))
            used += 1
    finally:
        for m, training in modes.items():
            m.train(training)
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    if used == 0:
        raise SurgeryError("recalibrate_bn got no batches; give at least one batch of inputs")
    return model
