"""Where a split's images come from: a dataset name, an ImageFolder directory, or a tar archive of one.

A source resolves to a dataset name (``"cifar10"``, ``"cifar100"``: torchvision downloads
it) or to the absolute path of a directory or archive. Listing a split gives its
encoded images in ImageFolder order (class folder, then file name), not yet decoded.
An archive is read in one streaming pass that keeps only the bytes of the wanted split.

>>> import pathlib, tempfile
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for name in ("dog/1.png", "cat/2.jpg", "cat/notes.txt"):
...     (root / "train" / name).parent.mkdir(parents=True, exist_ok=True)
...     _ = (root / "train" / name).write_bytes(b"")
>>> listing = scan_folder(root, "train")
>>> listing.names, listing.labels.tolist(), listing.classes
(['train/cat/2.jpg', 'train/dog/1.png'], [0, 1], ['cat', 'dog'])
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch
import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS

from surgery.core.errors import did_you_mean
from xross.data.progress import DelayedProgress
from xross.errors import XrossError

__all__ = [
    "ARCHIVE_SUFFIXES",
    "DATASETS",
    "EVAL_SPLITS",
    "TEXT_PREFIX",
    "Listing",
    "Split",
    "is_image",
    "resolve_source",
    "resolve_split",
    "scan_archive",
    "scan_folder",
    "torchvision_split",
]

DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}  # name -> torchvision.datasets class
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz")
TEXT_PREFIX = "text:"  # text:DIR, a folder of text files for --task causal_lm (xross.data.text reads it)
EVAL_SPLITS = ("test", "val")
"""The split a run evaluates on, by preference: ``test/`` when the source has one (then ``val/`` is left to
the user), else ``val/`` (ImageNet's own layout: ``train/`` and ``val/``)."""

Split = str | tuple[str, ...]  # a split folder, or candidates of which the first the source has is read

_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_CORRUPT_ARCHIVE = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile)
_SOURCES_HINT = (
    f"use {', '.join(DATASETS)}, or a path to an ImageFolder directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive"
)


# --------------------------------------------------------------------------- resolving


def resolve_source(source: str | os.PathLike) -> str | Path:
    """The dataset name, or the absolute path of an existing directory or archive."""
    if isinstance(source, str) and source in DATASETS:
        return source
    if isinstance(source, str) and source.startswith(TEXT_PREFIX):
        raise XrossError(f"'{source}' is text, not images: train language models on it with --task causal_lm")
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


def split_names(split: Split) -> tuple[str, ...]:
    """The candidate split names of ``split``, by preference."""
    return (split,) if isinstance(split, str) else tuple(split)


def resolve_split(origin: str | Path, split: Split) -> Split:
    """The split folder to read, where finding it is cheap (a dataset name, a directory); for an archive
    with several candidates, the candidates (:func:`scan_archive` picks one in its single pass).

    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("train", "val"):
    ...     (root / name).mkdir()
    >>> resolve_split(root, EVAL_SPLITS), resolve_split("cifar10", EVAL_SPLITS)
    ('val', 'test')
    >>> resolve_split(root, ("test",))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    xross.errors.XrossError: folder ... has no 'test/' folder (it has 'train', 'val'); pass one of those ...
    """
    names = split_names(split)
    if isinstance(origin, str):  # torchvision's datasets have train and test
        return next((name for name in names if name in ("train", "test")), names[0])
    if origin.is_dir():
        found = next((name for name in names if (origin / name).is_dir()), None)
        if found is None:
            raise _missing_split(f"folder {origin}", names, sorted(p.name for p in origin.iterdir() if p.is_dir()))
        return found
    return names[0] if len(names) == 1 else names


def torchvision_split(name: str, split: str, cache_root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10/100 through torchvision's downloader, as uint8 NCHW images and int64 labels."""
    if split not in ("train", "test"):
        raise XrossError(f"{name} has the splits 'train' and 'test', not '{split}'")
    dataset_class = getattr(torchvision.datasets, DATASETS[name])
    root = cache_root / name
    try:
        dataset = dataset_class(root=str(root), train=split == "train", download=True)
    except (OSError, RuntimeError) as e:
        raise XrossError(
            f"cannot download {name} into {root} ({e}); check the network, "
            "or pass a local ImageFolder directory or archive"
        ) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64), list(dataset.classes)


# --------------------------------------------------------------------------- listing


@dataclass
class Listing:
    """The images of one split before decoding, in ImageFolder order."""

    names: list[str]  # member or file path, for error messages
    payloads: list[bytearray | Path]  # the encoded bytes, or the file holding them
    labels: torch.Tensor
    classes: list[str]
    split: str | None = None  # the split folder they were read from (None: a folder of images, no split)


def is_image(name: str) -> bool:
    """Whether a file name has one of the image extensions ImageFolder reads."""
    return name.lower().endswith(IMG_EXTENSIONS)


def _listing(items: list[tuple[str, str, bytearray | Path]], where: str, split: str) -> Listing:
    """Sort ``(class, name, payload)`` items like ImageFolder and number the classes."""
    if not items:
        raise XrossError(
            f"no images ({', '.join(IMG_EXTENSIONS)}) in {where} under '{split}/<class>/'; "
            "put each class's images in its own folder"
        )
    items.sort(key=lambda item: (item[0], item[1]))
    classes = sorted({cls for cls, _, _ in items})
    index = {cls: i for i, cls in enumerate(classes)}
    labels = torch.tensor([index[cls] for cls, _, _ in items], dtype=torch.int64)
    return Listing([name for _, name, _ in items], [payload for _, _, payload in items], labels, classes, split)


def _missing_split(where: str, split: Split, found: Sequence[str]) -> XrossError:
    have = f"it has {', '.join(repr(s) for s in found)}" if found else "it has no split folders"
    wanted = " or ".join(f"'{name}/'" for name in split_names(split))
    return XrossError(
        f"{where} has no {wanted} folder ({have}); pass one of those splits or use the layout <split>/<class>/<image>"
    )


def scan_folder(root: Path, split: str) -> Listing:
    """The images of ``root/split/<class>/``."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise _missing_split(f"folder {root}", split, sorted(p.name for p in root.iterdir() if p.is_dir()))
    files = [path for path in split_dir.glob("*/*") if path.is_file() and is_image(path.name)]
    items: list[tuple[str, str, bytearray | Path]] = [
        (path.parent.name, str(path.relative_to(root)), path) for path in files
    ]
    return _listing(items, f"folder {root}", split)


# --------------------------------------------------------------------------- archives


def scan_archive(path: Path, split: Split, progress: bool) -> Listing:
    """One streaming pass over a tar archive, keeping the bytes of the images of ``split`` (of each candidate
    split, then those of the first the archive has).

    Members are ``<split>/<class>/<image>``, or all under one top-level folder
    ``<top>/<split>/<class>/<image>``.
    """
    wanted = split_names(split)
    image_paths: list[tuple[str, ...]] = []  # parts of every image member, to find the layout
    kept: list[tuple[tuple[str, ...], bytearray]] = []
    try:
        bar = DelayedProgress(f"reading {path.name}", path.stat().st_size, progress)
        with open(path, "rb") as raw, _decompressed(raw) as plain, bar:
            stream = _Counted(plain)
            # a stream ("r|") is only read; typeshed asks for a whole file object
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if member.isfile() and is_image(member.name) and len(parts) in (3, 4):
                        image_paths.append(parts)
                        if parts[-3] in wanted:
                            kept.append((parts, _read_member(tar, member)))
                    bar.update(raw.tell())
                _require_end(tar, stream)
    except _CORRUPT_ARCHIVE as e:
        raise XrossError(
            f"archive {path} is corrupt or truncated: {str(e) or type(e).__name__}; download or copy it again"
        ) from None
    root = _archive_root(image_paths)
    kept = [(parts, data) for parts, data in kept if parts[:-3] == root]
    found = next((name for name in wanted if any(parts[-3] == name for parts, _ in kept)), None)
    if image_paths and found is None:
        have = sorted({p[len(root)] for p in image_paths if len(p) == len(root) + 3})
        raise _missing_split(f"archive {path}", split, have)
    items: list[tuple[str, str, bytearray | Path]] = [
        (parts[-2], "/".join(parts), data) for parts, data in kept if parts[-3] == found
    ]
    return _listing(items, f"archive {path}", found or wanted[0])


def _decompressed(raw: BinaryIO) -> BinaryIO | io.BufferedIOBase:
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

    def __init__(self, stream: BinaryIO | io.BufferedIOBase) -> None:
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
    stream = tar.extractfile(member)  # a buffered reader (typeshed says IO[bytes], which has no readinto)
    if not isinstance(stream, io.BufferedIOBase) or stream.readinto(data) != member.size:
        raise tarfile.ReadError(f"member {member.name} is cut short")
    return data


def _archive_root(image_paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """``(top,)`` when every image is ``top/<split>/<class>/<image>``, else ``()``."""
    if image_paths and all(len(p) == 4 for p in image_paths) and len({p[0] for p in image_paths}) == 1:
        return image_paths[0][:1]
    return ()
