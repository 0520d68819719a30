"""Semi-supervised training data: a labelled fraction of a split, and folders of unlabelled images.

An image without a label carries :data:`xross.data.labels.UNLABELED` (-1); the objectives give it no
hard-label term (:func:`xross.data.labels.hard_label_ce`), only the mutual ones.

>>> import torch
>>> data = ImageTensors(torch.zeros(8, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), ["a", "b"])
>>> part = keep_labels(data, 0.25, seed=0)
>>> int((part.labels == UNLABELED).sum()), sorted(part.labels[part.labels >= 0].tolist())
(6, [0, 1])
"""

from __future__ import annotations

from pathlib import Path

import torch

from xross.data.augment import derive_seed
from xross.data.decode import ImageTensors, decode_all, stack
from xross.data.labels import UNLABELED
from xross.data.sources import Listing, is_image
from xross.data.subset import stratified
from xross.errors import XrossError


def keep_labels(data: ImageTensors, fraction: float, seed: int = 0) -> ImageTensors:
    """``data`` with only a stratified ``fraction`` of its images labelled (at least one), the rest UNLABELED."""
    if not 0 < fraction <= 1:
        raise XrossError(f"labeled_fraction={fraction} is not in (0, 1]; give e.g. 0.1 for a tenth of the labels")
    if fraction == 1:
        return data
    keep = stratified(data.labels, max(1, round(fraction * len(data))), derive_seed("labeled", seed), "the split")
    labels = torch.full_like(data.labels, UNLABELED)
    labels[keep] = data.labels[keep]
    return ImageTensors(data.images, labels, data.classes)


def load_unlabeled(folder: str | Path, image_size: int, progress: bool = False) -> ImageTensors:
    """Every image under ``folder`` (any depth, sorted by path), resized to ``image_size``, all UNLABELED."""
    root = Path(folder)
    if not root.is_dir():
        raise XrossError(f"unlabeled folder '{root}' does not exist; give a directory of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image(p.name))
    if not files:
        raise XrossError(f"no images in '{root}'; put .jpg/.png files in it (any sub-folders)")
    listing = Listing([str(p) for p in files], list(files), torch.full((len(files),), UNLABELED), [])
    images = stack(decode_all(listing, torch.arange(len(files)), progress), image_size)
    return ImageTensors(images, listing.labels, [])


def with_unlabeled(data: ImageTensors, extra: ImageTensors) -> ImageTensors:
    """``data`` followed by the unlabelled images ``extra`` (same image size)."""
    if extra.images.shape[1:] != data.images.shape[1:]:
        raise XrossError(
            f"unlabeled images are {tuple(extra.images.shape[1:])} but the training images are "
            f"{tuple(data.images.shape[1:])}; set image_size"
        )
    return ImageTensors(torch.cat([data.images, extra.images]), torch.cat([data.labels, extra.labels]), data.classes)


def labeled_only(data: ImageTensors) -> ImageTensors:
    """The labelled images of ``data`` (for objectives that learn nothing from the others)."""
    keep = data.labels != UNLABELED
    return ImageTensors(data.images[keep], data.labels[keep], data.classes)
