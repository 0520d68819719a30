"""Data pipeline of the ``xross`` trainer: decode once, cache, then batch and augment on device.

A split is decoded once into a uint8 ``(N, 3, H, W)`` tensor and cached on disk
(safetensors + JSON). Batches are then indexed, cropped, flipped and normalised on the
training device with a few tensor ops per batch: no per-image Python loop, no
DataLoader workers.

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

import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import tarfile
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch
import torchvision
from PIL import Image
from rich.console import Console
from rich.progress import Progress, TaskID
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from surgery._util import atomic_write, atomic_write_text
from xross.errors import XrossError
from surgery.errors import did_you_mean

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASETS",
    "Augment",
    "BatchLoader",
    "CropFlip",
    "ImageTensors",
    "load_split",
    "loader_throughput",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}  # name -> torchvision.datasets class
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz")
CACHE_FORMAT = 1  # bump when the decoded result of the same inputs changes

_PROGRESS_DELAY = 0.5  # seconds a job runs before its progress bar appears
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not a dependency yet)
_TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
_JPEG_MAGIC = b"\xff\xd8\xff"
_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_CORRUPT_ARCHIVE = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile)
_SOURCES_HINT = f"use {', '.join(DATASETS)}, or a path to an ImageFolder directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive"


@dataclass
class ImageTensors:
    """A decoded split: uint8 images ``(N, 3, H, W)`` (contiguous), int64 labels ``(N,)``, class names.

    ``labels[i]`` indexes ``classes``, which are in ImageFolder order (sorted folder names).

    >>> data = ImageTensors(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["cat", "dog"])
    >>> len(data)
    2
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]


# --------------------------------------------------------------------------- loading


def load_split(
    source: str | os.PathLike,
    split: str = "train",
    *,
    subset: int | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ImageTensors:
    """Decode one split of a dataset into uint8 tensors, cached on disk for the next call.

    Args:
        source: ``"cifar10"`` or ``"cifar100"`` (downloaded by torchvision into the cache
            directory), or a directory in ImageFolder layout ``<dir>/<split>/<class>/<image>``,
            or a ``.tar``/``.tar.gz``/``.tgz``/``.tar.xz`` archive of such a directory (its
            members may sit under one top-level folder). Images must sit directly in their
            class folder; classes are the class folders that hold images, sorted by name.
        split: the split folder to read (``"train"``, ``"test"``, ...).
        subset: keep only this many images, stratified: as equal per class as possible,
            chosen at random (deterministic in ``seed``), kept in dataset order.
        image_size: resize every image to ``image_size x image_size`` (antialiased) when
            its size differs. Required when the images do not all have one size.
        cache_dir: where decoded splits (and torchvision downloads) go; default
            ``$XROSS_CACHE`` or ``~/.cache/xross``.
        seed: seed of the subset choice.
        progress: show a transient progress bar when reading or decoding takes a while.

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
    """
    if subset is not None and subset <= 0:
        raise XrossError(f"subset={subset} is not a positive number of images; pass subset>=1 or None for all")
    if image_size is not None and image_size <= 0:
        raise XrossError(f"image_size={image_size} is not a positive size; pass image_size>=1 or None")
    origin = _resolve_source(source)
    cache_root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    entry = _CacheEntry.of(cache_root, origin, split, subset, image_size, seed)
    data = entry.read()
    if data is None:
        data = _build(origin, split, subset, image_size, seed, cache_root, progress)
        entry.write(data)
    return data


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XROSS_CACHE") or Path.home() / ".cache" / "xross")


def _resolve_source(source: str | os.PathLike) -> str | Path:
    """The dataset name, or the absolute path of an existing directory or archive."""
    if isinstance(source, str) and source in DATASETS:
        return source
    path = Path(source).expanduser().absolute()
    if not path.exists():
        if isinstance(source, str) and os.sep not in source and "/" not in source:
            raise XrossError(
                f"unknown dataset '{source}' (and no such path); {_SOURCES_HINT} ({did_you_mean(source, DATASETS)})"
            )
        raise XrossError(f"dataset path '{path}' does not exist; {_SOURCES_HINT}")
    if path.is_file() and not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise XrossError(f"'{path}' is neither a directory nor a {'/'.join(ARCHIVE_SUFFIXES)} archive; {_SOURCES_HINT}")
    return path


def _build(
    origin: str | Path, split: str, subset: int | None, image_size: int | None, seed: int, cache_root: Path, progress: bool
) -> ImageTensors:
    """Read, select and decode a split (the work a cache hit saves)."""
    where = f"the '{split}' split of {origin}"
    if isinstance(origin, str):
        images, labels, classes = _torchvision_split(origin, split, cache_root)
        keep = _stratified(labels, subset, seed, where)
        return ImageTensors(_resize(images[keep], image_size).contiguous(), labels[keep], classes)
    listing = _scan_archive(origin, split, progress) if origin.is_file() else _scan_folder(origin, split)
    keep = _stratified(listing.labels, subset, seed, where)
    return ImageTensors(_stack(_decode_all(listing, keep, progress), image_size), listing.labels[keep], listing.classes)


def _torchvision_split(name: str, split: str, cache_root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10/100 through torchvision's downloader, as uint8 NCHW images and int64 labels."""
    if split not in ("train", "test"):
        raise XrossError(f"{name} has the splits 'train' and 'test', not '{split}'")
    dataset_class = getattr(torchvision.datasets, DATASETS[name])
    root = cache_root / name
    try:
        dataset = dataset_class(root=str(root), train=split == "train", download=True)
    except (OSError, RuntimeError) as e:
        raise XrossError(
            f"cannot download {name} into {root} ({e}); check the network, or pass a local ImageFolder directory or archive"
        ) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64), list(dataset.classes)


# --------------------------------------------------------------------------- listing


@dataclass
class _Listing:
    """The images of one split before decoding, in ImageFolder order."""

    names: list[str]  # member or file path, for error messages
    payloads: list[bytearray | Path]  # the encoded bytes, or the file holding them
    labels: torch.Tensor
    classes: list[str]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _listing(items: list[tuple[str, str, bytearray | Path]], where: str, split: str) -> _Listing:
    """Sort ``(class, name, payload)`` items like ImageFolder and number the classes."""
    if not items:
        raise XrossError(
            f"no images ({', '.join(IMG_EXTENSIONS)}) in {where} under '{split}/<class>/'; put each class's images in its own folder"
        )
    items.sort(key=lambda item: (item[0], item[1]))
    classes = sorted({cls for cls, _, _ in items})
    index = {cls: i for i, cls in enumerate(classes)}
    labels = torch.tensor([index[cls] for cls, _, _ in items], dtype=torch.int64)
    return _Listing([name for _, name, _ in items], [payload for _, _, payload in items], labels, classes)


def _missing_split(where: str, split: str, found: Sequence[str]) -> XrossError:
    have = f"it has {', '.join(repr(s) for s in found)}" if found else "it has no split folders"
    return XrossError(f"{where} has no '{split}/' folder ({have}); pass one of those splits or use the layout <split>/<class>/<image>")


def _scan_folder(root: Path, split: str) -> _Listing:
    """The images of ``root/split/<class>/``."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise _missing_split(f"folder {root}", split, sorted(p.name for p in root.iterdir() if p.is_dir()))
    files = [path for path in split_dir.glob("*/*") if path.is_file() and _is_image(path.name)]
    items = [(path.parent.name, str(path.relative_to(root)), path) for path in files]
    return _listing(items, f"folder {root}", split)


def _scan_archive(path: Path, split: str, progress: bool) -> _Listing:
    """One streaming pass over a tar archive, keeping the bytes of the images of ``split``."""
    image_paths: list[tuple[str, ...]] = []  # parts of every image member, to find the layout
    kept: list[tuple[tuple[str, ...], bytearray]] = []
    try:
        bar = _Progress(f"reading {path.name}", path.stat().st_size, progress)
        with open(path, "rb") as raw, _decompressed(raw) as plain, bar:
            stream = _Counted(plain)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if member.isfile() and _is_image(member.name) and len(parts) in (3, 4):
                        image_paths.append(parts)
                        if parts[-3] == split:
                            kept.append((parts, _read_member(tar, member)))
                    bar.update(raw.tell())
                _require_end(tar, stream)
    except _CORRUPT_ARCHIVE as e:
        raise XrossError(f"archive {path} is corrupt or truncated: {str(e) or type(e).__name__}; download or copy it again") from None
    root = _archive_root(image_paths)
    items = [(parts[-2], "/".join(parts), data) for parts, data in kept if parts[:-3] == root]
    if image_paths and not items:
        raise _missing_split(f"archive {path}", split, sorted({p[len(root)] for p in image_paths if len(p) == len(root) + 3}))
    return _listing(items, f"archive {path}", split)


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """``raw`` decompressed by its magic bytes (gzip, xz) or as is.

    Not ``tarfile.open(mode="r|*")``: its gzip stream ends quietly where the file is cut;
    the ``gzip`` and ``lzma`` readers raise ``EOFError`` instead.
    """
    magic = raw.read(len(_XZ_MAGIC))
    raw.seek(0)
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic == _XZ_MAGIC:
        return lzma.LZMAFile(raw)
    return raw


class _Counted:
    """A read-only stream that counts the bytes it hands out."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


def _require_end(tar: tarfile.TarFile, stream: _Counted) -> None:
    """Fail unless the archive holds its end-of-archive block and its compressed stream is whole.

    Python's tarfile ends the member loop quietly at a cut header. Reading the stream to
    its end makes gzip and xz check their length and checksum; and the block where the
    loop stopped (``tar.offset``) must have been there to read.
    """
    while stream.read(1 << 20):
        pass
    if stream.count < tar.offset + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"unexpected end of data after {stream.count} bytes")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytearray:
    data = bytearray(member.size)
    stream = tar.extractfile(member)
    if stream is None or stream.readinto(data) != member.size:
        raise tarfile.ReadError(f"member {member.name} is cut short")
    return data


def _archive_root(image_paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """``(top,)`` when every image is ``top/<split>/<class>/<image>``, else ``()``."""
    if image_paths and all(len(p) == 4 for p in image_paths) and len({p[0] for p in image_paths}) == 1:
        return image_paths[0][:1]
    return ()


# --------------------------------------------------------------------------- subset


def _stratified(labels: torch.Tensor, subset: int | None, seed: int, where: str) -> torch.Tensor:
    """Indices (ascending) of a stratified random subset of ``subset`` images, or of all of them."""
    if subset is None:
        return torch.arange(len(labels))
    if subset > len(labels):
        raise XrossError(f"subset={subset} but {where} has only {len(labels)} images; pass subset<={len(labels)} or None")
    generator = _generator("subset", seed)
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


# --------------------------------------------------------------------------- decoding


def _decode_all(listing: _Listing, keep: torch.Tensor, progress: bool) -> list[torch.Tensor]:
    """Decode the images at ``keep`` into uint8 RGB ``(3, H, W)`` tensors."""
    images = []
    with _Progress(f"decoding {len(keep)} images", len(keep), progress) as bar, warnings.catch_warnings():
        warnings.filterwarnings("ignore", _TORCHVISION_IO_DEPRECATION, DeprecationWarning)
        for done, i in enumerate(keep.tolist(), start=1):
            payload = listing.payloads[i]
            data = payload if isinstance(payload, bytearray) else bytearray(payload.read_bytes())
            images.append(_decode(data, listing.names[i]))
            bar.update(done)
    return images


def _decode(data: bytearray, name: str) -> torch.Tensor:
    """A uint8 RGB ``(3, H, W)`` image: torchvision's fast decoder for JPEG, PIL for the rest.

    torchvision's PNG decoder can crash the process on a damaged file (pytorch/vision#3613,
    #6456); its JPEG decoder fails cleanly, so it keeps the common case fast.
    """
    if data[: len(_JPEG_MAGIC)] == _JPEG_MAGIC:
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL may read it; if not, the error below names the file
    return _decode_with_pil(data, name)


def _decode_with_pil(data: bytearray, name: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode.startswith("I;16"):  # 16-bit grey: keep the high byte (PIL would clip)
                pixels = np.repeat((np.array(image) >> 8).astype(np.uint8)[..., None], 3, axis=2)
            else:
                pixels = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise XrossError(f"cannot decode image '{name}' ({e}); replace or remove that file") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _stack(images: list[torch.Tensor], image_size: int | None) -> torch.Tensor:
    """One uint8 ``(N, 3, S, S)`` batch; images of each size are resized together."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for position, image in enumerate(images):
        by_size.setdefault((image.shape[1], image.shape[2]), []).append(position)
    if image_size is None:
        if len(by_size) > 1:
            sizes = ", ".join(f"{h}x{w}" for h, w in itertools.islice(by_size, 4))
            raise XrossError(f"the images have {len(by_size)} different sizes (e.g. {sizes}); pass image_size=N to resize them all to NxN")
        return torch.stack(images)
    batch = torch.empty((len(images), 3, image_size, image_size), dtype=torch.uint8)
    for positions in by_size.values():
        batch[positions] = _resize(torch.stack([images[p] for p in positions]), image_size)
    return batch


def _resize(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize a uint8 batch to ``image_size x image_size`` (antialiased) unless it has that size already."""
    if image_size is None or images.shape[-2:] == (image_size, image_size):
        return images
    return TF.resize(images, [image_size, image_size], antialias=True)


class _Progress:
    """A transient rich progress bar (on stderr) that appears once its job has run for a while."""

    def __init__(self, description: str, total: float, enabled: bool) -> None:
        self._description = description
        self._total = total
        self._enabled = enabled
        self._start = time.perf_counter()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def update(self, completed: float) -> None:
        if self._bar is None:
            if not self._enabled or time.perf_counter() - self._start < _PROGRESS_DELAY:
                return
            self._bar = Progress(*Progress.get_default_columns(), transient=True, console=Console(stderr=True))
            self._task = self._bar.add_task(self._description, total=self._total)
            self._bar.start()
        self._bar.update(self._task, completed=completed)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()


# --------------------------------------------------------------------------- cache


@dataclass
class _CacheEntry:
    """The two files of one cached split: tensors (safetensors) and metadata (JSON, written last)."""

    tensors: Path
    meta: Path
    key: dict[str, Any]

    @classmethod
    def of(cls, root: Path, origin: str | Path, split: str, subset: int | None, image_size: int | None, seed: int) -> _CacheEntry:
        key = {
            "format": CACHE_FORMAT,
            "source": str(origin),
            "stamp": _stamp(origin, split),
            "split": split,
            "subset": subset,
            "image_size": image_size,
            "seed": seed if subset is not None else None,  # the seed only picks the subset
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        stem = f"{Path(origin).name if isinstance(origin, Path) else origin}-{split}-{digest}"
        return cls(root / f"{stem}.safetensors", root / f"{stem}.json", key)

    def read(self) -> ImageTensors | None:
        """The cached split, or None when absent or unreadable (then with a warning)."""
        if not self.meta.is_file():
            return None
        try:
            meta = json.loads(self.meta.read_text())
            tensors = load_file(self.tensors)
            data = ImageTensors(tensors["images"], tensors["labels"], list(meta["classes"]))
            _check_cached(data, meta, self.key)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            warnings.warn(f"decoded-data cache {self.tensors} is unreadable ({e}); rebuilding it", stacklevel=3)
            return None
        return data

    def write(self, data: ImageTensors) -> None:
        """Store ``data`` atomically; a failure only warns (the data is decoded again next time)."""
        meta = {"key": self.key, "classes": data.classes, "count": len(data)}
        try:
            self.tensors.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.tensors, lambda tmp: save_file({"images": data.images, "labels": data.labels}, str(tmp)))
            atomic_write_text(self.meta, json.dumps(meta))
        except OSError as e:
            warnings.warn(
                f"cannot write the decoded-data cache in {self.tensors.parent} ({e}); "
                "pass cache_dir= a writable folder or set XROSS_CACHE",
                stacklevel=3,
            )


def _stamp(origin: str | Path, split: str) -> list[int]:
    """What changes when the source changes: size and mtime of a file, newest folder mtime of a directory."""
    if isinstance(origin, str):
        return []
    if origin.is_file():
        stat = origin.stat()
        return [stat.st_size, stat.st_mtime_ns]
    split_dir = origin / split
    folders = [origin, split_dir, *(p for p in split_dir.iterdir() if p.is_dir())] if split_dir.is_dir() else [origin]
    return [max(folder.stat().st_mtime_ns for folder in folders)]


def _check_cached(data: ImageTensors, meta: dict[str, Any], key: dict[str, Any]) -> None:
    """Raise ValueError unless the cached tensors are a well-formed split for ``key``."""
    images, labels = data.images, data.labels
    if meta.get("key") != key:
        raise ValueError("its key does not match")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images are {images.dtype} {tuple(images.shape)}, not uint8 (N, 3, H, W)")
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],) or labels.shape[0] != meta.get("count"):
        raise ValueError(f"labels are {labels.dtype} {tuple(labels.shape)} for {meta.get('count')} images")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(data.classes):
        raise ValueError(f"labels fall outside the {len(data.classes)} classes")


# --------------------------------------------------------------------------- augmentation


def derive_seed(*parts: str | int) -> int:
    """A 63-bit seed from ``parts`` by a fixed hash (the same in every process and Python version)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*parts: str | int) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class CropFlip:
    """Random parameters of an augmented batch, on CPU: crop offsets into the padded images, flips.

    Slicing it (``params[2:4]``) gives the parameters of those samples.
    """

    top: torch.Tensor  # int64 (N,), row offset into the padded image
    left: torch.Tensor  # int64 (N,), column offset into the padded image
    flip: torch.Tensor  # bool (N,), mirror horizontally

    def __getitem__(self, index: slice) -> CropFlip:
        return CropFlip(self.top[index], self.left[index], self.flip[index])


class Augment:
    """Batched, on-device: random crop with zero padding, horizontal flip, normalise.

    The crop pads the uint8 batch with ``crop_padding`` zero pixels on each side and cuts
    every sample at its own offset with one gather op; the flip mirrors the gather's
    column indices for the flipped samples (``torch.where``), so it costs nothing more.
    Normalisation is ``(x / 255 - mean) / std`` in float32. Random numbers come from a
    CPU generator, so a seed gives the same batch on every device.

    >>> augment = Augment()
    >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> out = augment(images, torch.Generator().manual_seed(0))
    >>> out.shape, out.dtype
    (torch.Size([8, 3, 32, 32]), torch.float32)
    >>> torch.equal(augment(images, torch.Generator().manual_seed(0)), out)
    True
    """

    def __init__(
        self,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
        crop_padding: int = 4,
        flip: bool = True,
    ) -> None:
        if len(mean) != len(std):
            raise XrossError(f"mean has {len(mean)} channels but std has {len(std)}; give one value per channel to each")
        if crop_padding < 0:
            raise XrossError(f"crop_padding={crop_padding} is negative; pass 0 to turn the random crop off")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop_padding = crop_padding
        self.flip = flip
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"Augment(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
            f"crop_padding={self.crop_padding}, flip={self.flip})"
        )

    def __call__(self, images_uint8: torch.Tensor, generator: torch.Generator | None = None, train: bool = True) -> torch.Tensor:
        """Augmented (``train=True``) or only normalised float32 images, on the input's device."""
        return self.apply(images_uint8, self.sample(len(images_uint8), generator) if train else None)

    def sample(self, n: int, generator: torch.Generator | None = None) -> CropFlip:
        """Draw the crop offsets and flips of ``n`` samples from a CPU ``generator``."""
        span = 2 * self.crop_padding + 1
        top = torch.randint(span, (n,), generator=generator)
        left = torch.randint(span, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return CropFlip(top, left, flip)

    def apply(self, images_uint8: torch.Tensor, params: CropFlip | None) -> torch.Tensor:
        """Crop and flip by ``params`` (None: neither), then normalise."""
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise XrossError(f"Augment takes uint8 (N, C, H, W) images, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        images = images_uint8 if params is None else self._crop_flip(images_uint8, params)
        mean, std = self._stats(images.device)
        return images.float().div_(255).sub_(mean).div_(std)

    def _crop_flip(self, images: torch.Tensor, params: CropFlip) -> torch.Tensor:
        n, c, h, w = images.shape
        device = images.device
        pad = self.crop_padding
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        top, left, flip = params.top.to(device), params.left.to(device), params.flip.to(device)
        rows = top[:, None] + torch.arange(h, device=device)  # (N, H)
        cols = left[:, None] + torch.arange(w, device=device)  # (N, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        pixels = rows[:, :, None] * padded.shape[-1] + cols[:, None, :]  # (N, H, W) flat offsets in a padded plane
        return padded.flatten(2).gather(2, pixels.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]


# --------------------------------------------------------------------------- batching


def _shard(n: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous part of ``n`` samples (``torch.tensor_split`` sizes: they differ by at most one)."""
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


class BatchLoader:
    """Deterministic epochs of augmented batches, resumable mid-epoch, shardable across ranks.

    ``batch_size`` is the global batch size. Each step takes the next ``batch_size``
    indices of the epoch order (a permutation seeded by ``(seed, epoch)`` when ``train``,
    the natural order otherwise) and rank ``r`` of ``world_size`` keeps the ``r``-th of
    ``world_size`` contiguous, near-equal parts of them (the :func:`torch.tensor_split`
    split). The augmentation of step ``s`` is drawn for the whole global batch from a
    generator seeded by ``(seed, epoch, s)`` and sliced the same way. So the ranks of a
    data-parallel run together see exactly the samples, and exactly the augmentation,
    of a one-process run with the same global batch. With ``drop_last=False`` (the
    default when evaluating) the last batch is partial and is split the same way, so
    each sample is seen exactly once overall; a rank's part of it may be empty.

    The uint8 images are moved to ``device`` once; batches are gathered, augmented and
    normalised there. ``train=False`` only normalises (with ``augment``'s mean and std).

    >>> data = ImageTensors(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10) % 2, ["a", "b"])
    >>> loader = BatchLoader(data, batch_size=4, seed=1)
    >>> len(loader), [y.tolist() for _, y in loader.epoch(0, start_step=1)] == [y.tolist() for _, y in loader.epoch(0)][1:]
    (2, True)
    >>> [len(y) for _, y in BatchLoader(data, 4, train=False, rank=1, world_size=2).epoch(0)]
    [2, 2, 1]
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        *,
        train: bool = True,
        augment: Augment | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0 or world_size <= 0 or batch_size % world_size:
            raise XrossError(
                f"batch_size={batch_size} is not a positive multiple of world_size={world_size}; "
                "batch_size is the global batch, pass a multiple of the number of processes"
            )
        if not 0 <= rank < world_size:
            raise XrossError(f"rank={rank} is outside 0..{world_size - 1} for world_size={world_size}")
        self.batch_size = batch_size
        self.train = train
        self.augment = augment if augment is not None else Augment()
        self.device = torch.device(device)
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.rank = rank
        self.world_size = world_size
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        if len(self) == 0 and len(data) > 0:
            raise XrossError(f"{len(data)} images make no full batch of {batch_size}; lower batch_size or pass drop_last=False")

    def __len__(self) -> int:
        """Steps per epoch."""
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(float images, int64 labels)`` batches of ``epoch`` from step ``start_step`` on."""
        if not 0 <= start_step <= len(self):
            raise XrossError(f"start_step={start_step} is outside 0..{len(self)} (steps per epoch)")
        order = self._order(epoch)
        return (self._batch(order, epoch, step) for step in range(start_step, len(self)))

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if not self.train:
            return torch.arange(n, device=self.device)
        return torch.randperm(n, generator=_generator("order", self.seed, epoch)).to(self.device)

    def _batch(self, order: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = order[step * self.batch_size : (step + 1) * self.batch_size]
        mine = _shard(len(batch), self.rank, self.world_size)
        params = self.augment.sample(len(batch), _generator("augment", self.seed, epoch, step))[mine] if self.train else None
        index = batch[mine]
        return self.augment.apply(self.images[index], params), self.labels[index]


def loader_throughput(
    data: ImageTensors, batch_size: int = 64, steps: int = 50, device: torch.device | str = "cpu"
) -> float:
    """Augmented images per second of the training pipeline alone (no model), over ``steps`` batches.

    >>> data = ImageTensors(torch.zeros(128, 3, 32, 32, dtype=torch.uint8), torch.zeros(128, dtype=torch.int64), ["a"])
    >>> loader_throughput(data, batch_size=64, steps=3) > 0
    True
    """
    if steps <= 0:
        raise XrossError(f"steps={steps} is not positive; pass steps>=1")
    loader = BatchLoader(data, batch_size, device=device)
    batches = itertools.islice(itertools.chain.from_iterable(map(loader.epoch, itertools.count())), steps)
    start = time.perf_counter()
    seen = sum(len(images) for images, _ in batches)
    if loader.device.type == "cuda":
        torch.cuda.synchronize(loader.device)
    return seen / (time.perf_counter() - start)
