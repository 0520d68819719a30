"""Choosing a stratified random subset of a split: as equal per class as possible, kept in dataset order.

>>> labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
>>> keep = stratified(labels, 5, seed=0, where="the example")
>>> torch.bincount(labels[keep]).tolist(), bool((keep.diff() > 0).all())
([2, 2, 1], True)
"""

from __future__ import annotations

import torch

from xross.data.augment import seeded_generator
from xross.errors import XrossError

__all__ = ["stratified"]


def stratified(labels: torch.Tensor, subset: int | None, seed: int, where: str) -> torch.Tensor:
    """Indices (ascending) of a stratified random subset of ``subset`` images, or of all of them.

    ``where`` names the split in the error raised when it has fewer than ``subset`` images.
    """
    if subset is None:
        return torch.arange(len(labels))
    if subset > len(labels):
        raise XrossError(
            f"subset={subset} but {where} has only {len(labels)} images; pass subset<={len(labels)} or None"
        )
    generator = seeded_generator("subset", seed)
    counts = torch.bincount(labels)
    quotas = _quotas(counts, subset, generator)
    picks = [
        torch.nonzero(labels == cls).flatten()[torch.randperm(int(counts[cls]), generator=generator)[: int(quota)]]
        for cls, quota in enumerate(quotas)
    ]
    return torch.cat(picks).sort().values


def _quotas(counts: torch.Tensor, total: int, generator: torch.Generator) -> torch.Tensor:
    """Images per class summing to ``total``, as equal as the class sizes allow (the odd ones at random)."""
    quotas = torch.zeros_like(counts)
    while total > 0:
        open_classes = torch.nonzero(quotas < counts).flatten()
        share = total // len(open_classes)
        if share == 0:
            lucky = open_classes[torch.randperm(len(open_classes), generator=generator)[:total]]
            quotas[lucky] += 1
            break
        added = torch.clamp(counts[open_classes] - quotas[open_classes], max=share)
        quotas[open_classes] += added
        total -= int(added.sum())
    return quotas
