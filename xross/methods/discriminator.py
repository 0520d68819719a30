"""MEAL V2's discriminator: tells the student's logits from the teachers' ensemble logits.

Shaped as MEAL V2's training script builds it: 1x1 convolutions (linear layers on the
logit vector) ``C -> C/8 -> C/64 -> 2`` with a ReLU after *each*, the last included
(so its two outputs are non-negative). Trained with binary cross-entropy on the
two-column targets ``[1, 0]`` for student outputs and ``[0, 1]`` for teacher outputs.

The sign of its loss in the student is the choice ``mode`` makes:

* ``"joint"`` (MEAL V2's code): the distillation loss and the discriminator loss are
  summed and back-propagated together, so the student receives the discriminator loss's
  gradient **with the same sign** as the discriminator: both descend it. The student is
  pushed to be *easier* to tell apart, a regulariser rather than an adversary.
* ``"grl"`` (MEAL v1): the student's logits pass a gradient-reversal layer, so the
  student receives that gradient **negated**: it ascends the discriminator loss, to look
  like the teachers, while the discriminator descends it.

>>> import torch
>>> d = Discriminator(10, mode="grl")
>>> terms = d.loss(torch.randn(4, 10), torch.randn(4, 10))
>>> sorted(terms)
['d_acc', 'd_loss']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xross.errors import XrossError

MODES = ("joint", "grl")


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; the gradient flows back negated (Ganin & Lempitsky's reversal layer)."""
    return _ReverseGradient.apply(x)


def default_hidden(num_classes: int) -> list[int]:
    """MEAL V2's widths ``C/8, C/64``, each at least 8 (so that 10 classes still get a network)."""
    return [max(num_classes // 8, 8), max(num_classes // 64, 8)]


class Discriminator(nn.Module):
    """Linear layers on logits, ReLU after each (the last too); ``loss`` gives its BCE and accuracy."""

    def __init__(self, num_classes: int, hidden: Sequence[int] | None = None, mode: str = "joint"):
        super().__init__()
        if mode not in MODES:
            raise XrossError(f"unknown discriminator mode '{mode}'; choose one of {', '.join(MODES)}")
        self.mode = mode
        widths = [num_classes, *(hidden if hidden is not None else default_hidden(num_classes)), 2]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.net(logits)

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``d_loss`` (BCE, mean over both halves) and ``d_acc`` (% of outputs it tells right, no gradient).

        The teacher side is detached; the student side carries the gradient ``mode`` says.
        """
        student = reverse_gradient(student_logits) if self.mode == "grl" else student_logits
        inputs = torch.cat([student, teacher_logits.detach().to(student_logits.dtype)])
        n = len(student_logits)
        target = torch.zeros(2 * n, 2, device=inputs.device, dtype=inputs.dtype)
        target[:n, 0] = 1.0  # student: [1, 0]
        target[n:, 1] = 1.0  # teacher: [0, 1]
        out = self(inputs)
        wide = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        d_loss = F.binary_cross_entropy_with_logits(wide, target.to(wide.dtype))
        with torch.no_grad():
            acc = 100.0 * (out.argmax(1) == target.argmax(1)).float().mean()
        return {"d_loss": d_loss, "d_acc": acc}
