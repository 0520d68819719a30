"""Data pipeline of the ``xross`` trainer: decode once, cache, then batch and augment on device.

A split is decoded once into a uint8 ``(N, 3, H, W)`` tensor and cached on disk
(safetensors + JSON). Batches are then indexed, cropped, flipped and normalised on the
training device with a few tensor ops per batch: no per-image Python loop, no
DataLoader workers.

The modules, in the order a split goes through them: :mod:`~xross.data.sources`
(names, folders, archives; listing a split), :mod:`~xross.data.subset` (a stratified
subset), :mod:`~xross.data.decode` (images to tensors), :mod:`~xross.data.cache` (the
decoded-data cache and its size cap), :mod:`~xross.data.augment` (crop, flip,
normalise; seeds) and :mod:`~xross.data.loader` (batches, shards). :mod:`~xross.data.synthetic`
writes a small generated CIFAR-10-like dataset for tests and examples.

>>> import pathlib, tempfile, numpy as np, torch
>>> from PIL import Image
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for name in ("cat", "dog"):
...     (root / "train" / name).mkdir(parents=True)
...     for i in range(3):
...         Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "train" / name / f"{i}.png")
>>> data = load_split(root, "train", subset=4, cache_dir=root / "cache", progress=False)
>>> data.images.shape, data.labels.tolist(), data.classes
(torch.Size([4, 3, 8, 8]), [0, 0, 1, 1], ['cat', 'dog'])
>>> loader = BatchLoader(data, batch_size=2, seed=0)
>>> [(tuple(x.shape), x.dtype) for x, y in loader.epoch(0)]
[((2, 3, 8, 8), torch.float32), ((2, 3, 8, 8), torch.float32)]
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from xross.data import sources
from xross.data.augment import CIFAR_MEAN, CIFAR_STD, Augment, CropFlip, derive_seed
from xross.data.cache import (
    CACHE_FORMAT,
    DEFAULT_CACHE_MAX_GB,
    CachedSplit,
    CacheEntry,
    cache_info,
    clear_cache,
    default_cache_dir,
    max_cache_bytes,
)
from xross.data.decode import ImageTensors, decode_all, resize, stack
from xross.data.loader import BatchLoader, loader_throughput
from xross.data.sources import ARCHIVE_SUFFIXES, DATASETS, EVAL_SPLITS, Split
from xross.data.subset import stratified
from xross.errors import XrossError

__all__ = [
    "split_holdout",
    "ARCHIVE_SUFFIXES",
    "CACHE_FORMAT",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASETS",
    "DEFAULT_CACHE_MAX_GB",
    "EVAL_SPLITS",
    "Augment",
    "BatchLoader",
    "CachedSplit",
    "CropFlip",
    "ImageTensors",
    "cache_info",
    "clear_cache",
    "default_cache_dir",
    "derive_seed",
    "load_split",
    "loader_throughput",
]


def load_split(
    source: str | os.PathLike,
    split: Split = "train",
    *,
    subset: int | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    cache_max_gb: float | None = None,
) -> ImageTensors:
    """Decode one split of a dataset into uint8 tensors, cached on disk for the next call.

    Args:
        source: ``"cifar10"`` or ``"cifar100"`` (downloaded by torchvision into the cache
            directory), or a directory in ImageFolder layout ``<dir>/<split>/<class>/<image>``,
            or a ``.tar``/``.tar.gz``/``.tgz``/``.tar.xz`` archive of such a directory (its
            members may sit under one top-level folder). Images must sit directly in their
            class folder; classes are the class folders that hold images, sorted by name.
        split: the split folder to read (``"train"``, ``"test"``, ...), or candidates of which the first the
            source has is read (:data:`EVAL_SPLITS`: ``test/``, else ``val/``); the result's ``split`` names it.
        subset: keep only this many images, stratified: as equal per class as possible,
            chosen at random (deterministic in ``seed``), kept in dataset order.
        image_size: resize every image to ``image_size x image_size`` (antialiased) when
            its size differs. Required when the images do not all have one size.
        cache_dir: where decoded splits (and torchvision downloads) go; default
            ``$XROSS_CACHE`` or ``~/.cache/xross``.
        seed: seed of the subset choice.
        progress: show a transient progress bar when reading or decoding takes a while.
        cache_max_gb: size cap of the decoded splits in ``cache_dir``, in GiB; default
            ``$XROSS_CACHE_MAX_GB`` or 20. After a split is written, the least recently
            used others are removed until the cache fits (see :mod:`xross.data.cache`).

    The cache key hashes the absolute source path, its size and modification time (for a
    directory: the newest modification time of it, its split folder and class folders),
    ``split``, ``subset``, ``image_size``, ``seed`` and a format version. Files are
    written atomically; an unreadable cache file is rebuilt with a warning.

    An archive is read in one streaming pass that keeps only the bytes of the wanted
    split; then only the chosen images are decoded.

    >>> import pathlib, tempfile, numpy as np
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "test" / "cat").mkdir(parents=True)
    >>> Image.fromarray(np.zeros((5, 7), np.uint8)).save(root / "test" / "cat" / "a.png")
    >>> load_split(root, "test", image_size=4, cache_dir=root / "cache", progress=False).images.shape
    torch.Size([1, 3, 4, 4])
    >>> _ = (root / "test").rename(root / "val")  # ImageNet's layout: train/ and val/
    >>> load_split(root, EVAL_SPLITS, cache_dir=root / "cache", progress=False).split
    'val'
    """
    if subset is not None and subset <= 0:
        raise XrossError(f"subset={subset} is not a positive number of images; pass subset>=1 or None for all")
    if image_size is not None and image_size <= 0:
        raise XrossError(f"image_size={image_size} is not a positive size; pass image_size>=1 or None")
    max_bytes = max_cache_bytes(cache_max_gb)
    origin = sources.resolve_source(source)
    split = sources.resolve_split(origin, split)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = CacheEntry.of(cache_root, origin, split, subset, image_size, seed)
    data = entry.read()
    if data is None:
        data = _build(origin, split, subset, image_size, seed, cache_root, progress)
        entry.write(data, max_bytes)
    return data


def _build(
    origin: str | Path,
    split: Split,
    subset: int | None,
    image_size: int | None,
    seed: int,
    cache_root: Path,
    progress: bool,
) -> ImageTensors:
    """Read, select and decode a split (the work a cache hit saves)."""
    if isinstance(origin, str):
        assert isinstance(split, str)  # resolved: a dataset name's splits are known
        images, labels, classes = sources.torchvision_split(origin, split, cache_root)
        keep = stratified(labels, subset, seed, f"the '{split}' split of {origin}")
        return ImageTensors(resize(images[keep], image_size).contiguous(), labels[keep], classes, split)
    if origin.is_file():
        listing = sources.scan_archive(origin, split, progress)
    else:
        assert isinstance(split, str)  # resolved: a directory's folders are known
        listing = sources.scan_folder(origin, split)
    keep = stratified(listing.labels, subset, seed, f"the '{listing.split}' split of {origin}")
    images = stack(decode_all(listing, keep, progress), image_size)
    return ImageTensors(images, listing.labels[keep], listing.classes, listing.split)


def split_holdout(data: ImageTensors, holdout: int, seed: int = 0) -> tuple[ImageTensors, ImageTensors]:
    """(the images trained on, ``holdout`` images held out): a stratified choice, deterministic in ``seed``.

    >>> import torch
    >>> data = ImageTensors(torch.zeros(6, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 1, 1]), ["a", "b"])
    >>> train, held = split_holdout(data, 2)
    >>> len(train), held.labels.tolist()
    (4, [0, 1])
    """
    if holdout <= 0:
        return data, ImageTensors(data.images[:0], data.labels[:0], data.classes, data.split)
    if holdout >= len(data):
        raise XrossError(f"holdout={holdout} leaves nothing of the {len(data)} training images; give a smaller one")
    held = stratified(data.labels, holdout, derive_seed("holdout", seed), "the training split")
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[held] = False
    return (
        ImageTensors(data.images[keep], data.labels[keep], data.classes, data.split),
        ImageTensors(data.images[held], data.labels[held], data.classes, data.split),
    )
