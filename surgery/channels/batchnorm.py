"""Re-estimate BatchNorm statistics from data (US-Nets' post-training calibration).

A network trained at several widths or resolutions shares its weights between them,
but the mean and variance a BatchNorm layer sees differ for each: running averages
collected during training fit none of them. :func:`recalibrate_bn` resets every
BatchNorm's running statistics and re-estimates them as the *cumulative* average of the
batch statistics over the given batches (``momentum=None``), with everything else in
eval mode (dropout off) and no gradients.

Under ``torch.distributed`` (a process group of several ranks, e.g. ``torchrun``), each rank
passing its slice of the same batches, every BatchNorm normalises with, and accumulates, the
statistics of the whole batch over all ranks (:func:`global_batch_norm`): every rank ends with
the statistics one process computes on the whole batches.

>>> import torch, torchvision, surgery
>>> net = torchvision.models.resnet18(num_classes=10)
>>> batches = [torch.randn(8, 3, 32, 32) for _ in range(4)]
>>> net = surgery.recalibrate_bn(net, batches).eval()
>>> int(net.bn1.num_batches_tracked)
4
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from surgery.core.errors import SurgeryError

BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[BatchNorm]:
    """Every BatchNorm layer of ``model`` that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, BatchNorm) and m.track_running_stats]


def distributed() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """A differentiable sum over ranks (``torch.distributed.nn``'s, whose deprecation warning on every call,
    in favour of functional collectives, is silenced: one line per BatchNorm per step otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        return differentiable_all_reduce(t)


def global_batch_norm(bn: BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn`` in training mode on ``x``, the rank's slice of a batch, with the statistics of the whole batch over
    every rank: two differentiable all-reduces (the sums, for the mean; the squared deviations, for the variance).
    The running statistics are updated as :class:`torch.nn.BatchNorm2d` does (``momentum=None``: cumulative)."""
    c, dims = x.shape[1], [0, *range(2, x.dim())]
    shape = (1, c) + (1,) * (x.dim() - 2)
    count = torch.tensor([x.numel() / c], device=x.device, dtype=x.dtype)
    total = all_reduce(torch.cat([x.sum(dim=dims), count]))
    n = total[-1]
    mean = total[:c] / n
    centred = x - mean.view(shape)
    var = all_reduce(centred.pow(2).sum(dim=dims)) / n
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            tracked = bn.num_batches_tracked
            assert tracked is not None, "a norm that tracks running statistics counts its batches"
            tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


def _images(batch: Any) -> Any:
    """The input of a batch given as ``images`` or ``(images, labels)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None) -> nn.Module:
    """Reset and re-estimate the running statistics of every BatchNorm in ``model``; returns ``model``.

    Args:
        model: any module; a module with its own ``recalibrate_bn(batches, num_batches)``
            method (a :class:`surgery.channels.slim.SlimNet`) is calibrated by that method instead.
        batches: input tensors, or ``(inputs, labels)`` pairs, on the model's device.
        num_batches: use at most this many batches (default: all).

    The model's train/eval mode and every BatchNorm's momentum are restored afterwards. Under
    ``torch.distributed`` every rank must pass the same number of batches (each its slice of them).

    >>> import torch, surgery
    >>> net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32)
    >>> batches = [torch.randn(8, 3, 32, 32) + 5 for _ in range(2)]  # data whose mean is 5, not 0
    >>> net = surgery.recalibrate_bn(net, batches)
    >>> bool(net.features[0].block.bn.running_mean.abs().max() > 0), net.training  # estimated; mode restored
    (True, True)
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
    patched = [bn for bn in layers if distributed() and not isinstance(bn, nn.SyncBatchNorm)]  # Sync: already global
    used = 0
    try:
        model.eval()
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches seen
            bn.train()
        for bn in patched:  # statistics of the whole batch, every rank's slice together
            bn.forward = functools.partial(global_batch_norm, bn)  # type: ignore[method-assign]
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            model(_images(batch))
            used += 1
    finally:
        for bn in patched:
            del bn.forward  # the class's own again
        for m, training in modes.items():
            m.train(training)
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    if used == 0:
        raise SurgeryError("recalibrate_bn got no batches; give at least one batch of inputs")
    return model
