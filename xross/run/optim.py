"""Optimisers and learning-rate schedules (registries, no if/else chains).

Both are :class:`~surgery.core.registry.Registry` tables (:data:`OPTIMIZERS`,
:data:`SCHEDULES`), so an unknown name is refused in one line naming the closest ones.
Schedules are pure functions of the global step, so a resumed run sets exactly the
learning rate the uninterrupted run had: nothing to checkpoint but the step.

>>> from xross.run.optim import lr_at
>>> lr_at("cosine", base=0.1, step=50, total=100, steps_per_epoch=10, warmup_epochs=0)
0.05
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from surgery.core.registry import Registry
from xross.errors import XrossError
from xross.run.config import RunConfig

ParamGroup = dict[str, Any]
Schedule = Callable[[float, float, RunConfig], float]

OPTIMIZERS: Registry[Callable[[Any, RunConfig], torch.optim.Optimizer]] = Registry("optimizer", error=XrossError)
OPTIMIZERS.register(
    "sgd",
    lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay),
)
OPTIMIZERS.register("adam", lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay))
OPTIMIZERS.register("adamw", lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay))
SCHEDULES: Registry[Schedule] = Registry("lr schedule", error=XrossError)


def make_optimizer(params: Iterable[torch.nn.Parameter] | list[ParamGroup], config: RunConfig) -> torch.optim.Optimizer:
    """The config's optimizer over ``params`` or parameter groups; a group's ``lr_scale`` scales its rate."""
    return OPTIMIZERS.get(config.optimizer)(params, config)


@SCHEDULES.register("constant")
def _constant(progress: float, epoch: float, c: RunConfig) -> float:
    return 1.0


@SCHEDULES.register("cosine")
def _cosine(progress: float, epoch: float, c: RunConfig) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("step")
def _step(progress: float, epoch: float, c: RunConfig) -> float:
    return c.step_gamma ** int(epoch // max(c.step_epochs, 1))


def lr_at(
    schedule: str,
    base: float,
    step: int,
    total: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    config: RunConfig | None = None,
) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up, then the schedule over the rest."""
    rate = SCHEDULES.get(schedule)
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return base * rate(progress, step / max(steps_per_epoch, 1), config or RunConfig())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr`` times the group's ``lr_scale`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
