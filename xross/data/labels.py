"""Hard labels, some of them missing: the label of an image without one is ``UNLABELED`` (-1).

Semi-supervised runs (``labeled_fraction``, ``unlabeled``) mix labelled and unlabelled images in a
batch. Every hard-label term goes through :func:`hard_label_ce`: an unlabelled image's cross-entropy
is exactly zero (it contributes only the mutual terms) and the term is the mean over the labelled
images of the batch (zero when there are none), as ``ignore_index`` does in PyTorch.

>>> import torch
>>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
>>> full = hard_label_ce(logits[:2], torch.tensor([0, 0]))
>>> bool(hard_label_ce(logits, torch.tensor([0, 0, UNLABELED])) == full)
True
>>> float(hard_label_ce(logits, torch.full((3,), UNLABELED)))
0.0
>>> labeled_accuracy(logits, torch.tensor([0, 0, UNLABELED]))
50.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNLABELED = -1


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Losses in at least float32 (mixed precision hands over half-precision logits)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_image_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each image, exactly 0 for unlabelled ones (computed in at least float32)."""
    return F.cross_entropy(
        upcast(logits), labels, reduction="none", ignore_index=UNLABELED, label_smoothing=label_smoothing
    )


def hard_label_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the labelled images of the batch; 0 (with a gradient of 0) when none is."""
    labeled = labels != UNLABELED
    if bool(labeled.all()):  # the usual case: the plain mean, exactly as F.cross_entropy gives it
        return F.cross_entropy(upcast(logits), labels, label_smoothing=label_smoothing)
    return per_image_ce(logits, labels, label_smoothing).sum() / labeled.sum().clamp_min(1)


def labeled_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 (%) over the labelled images; NaN when none is."""
    labeled = labels != UNLABELED
    if not bool(labeled.any()):
        return float("nan")
    return 100.0 * float((logits[labeled].argmax(1) == labels[labeled]).float().mean())
