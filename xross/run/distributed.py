"""Data-parallel training under ``torchrun`` (gloo on CPU, nccl on CUDA): the process group and what the
ranks share besides gradients.

Each rank trains on its slice of every global batch; how the gradients meet is the run's ``--parallel``
engine (:mod:`xross.run.parallel`: DDP, FSDP2, or :func:`average_gradients`, the hand-written flat
all-reduce). BatchNorm statistics are made global across ranks (``SyncBatchNorm`` on CUDA,
:class:`GlobalBatchNorm2d` on CPU, where ``SyncBatchNorm`` refuses to run); stop requests, growth examples
and evaluation counts are shared by the helpers below.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from surgery.channels.batchnorm import distributed, global_batch_norm


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def pick_device(preference: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (env ``WORLD_SIZE`` > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_preference)
    if world <= 1:
        return DistInfo(0, 1, device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """All-reduce (mean) the gradients of ``params`` that have one, as one flat buffer."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a stop request)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def same_on_every_rank(batch: torch.Tensor, info: DistInfo, count: int = 16) -> torch.Tensor:
    """The first ``count`` images of rank 0's ``batch`` on every rank (fewer if a rank has fewer): what every
    rank must compute the same thing from, e.g. the statistics of the layers a growth inserts."""
    if not info.enabled:
        return batch[:count]
    n = torch.tensor([min(count, len(batch))], device=info.device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    shared = batch[: int(n.item())].contiguous().to(info.device)
    dist.broadcast(shared, src=0)
    return shared.to(batch.device)


def sum_over_ranks(counts: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise sum of ``counts`` over every rank (``counts`` itself outside distributed runs)."""
    if not info.enabled:
        return counts
    total = counts.to(info.device, copy=True)
    dist.all_reduce(total)
    return total.to(counts.device)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every rank (works on CPU with gloo).

    Two differentiable all-reduces per call (:func:`surgery.channels.batchnorm.global_batch_norm`). Outside
    distributed training it is a plain BatchNorm2d.
    """

    surgery_leaf = True  # traced as one call, like the BatchNorm2d it replaces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed()):
            return super().forward(x)
        return global_batch_norm(self, x)


def globalise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm2d of ``model`` use global statistics (in place; returns the model)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            like = next((t for t in [*child.parameters(), *child.buffers()] if t.is_floating_point()), None)
            if like is not None:  # the dtype and device of the layer it replaces (a float64 run's growth, say)
                new = new.to(device=like.device, dtype=like.dtype)
            new.load_state_dict(child.state_dict())
            for key, param in child.named_parameters(recurse=False):
                setattr(new, key, param)  # the same parameters: what holds them (an optimiser, a growth) still does
            new.train(child.training)
            setattr(model, name, new)
        else:
            globalise_batchnorm(child, device)
    return model
