"""The decoded-data cache: one decoded split per entry, pruned to a size cap, least recently used first.

An entry is two files in the cache directory (``$XROSS_CACHE``, default ``~/.cache/xross``):
``<name>-<split>-<digest>.safetensors`` (the uint8 images and int64 labels) and the
``.json`` beside it (key, classes, count; written last, so an entry without it is
incomplete). Both are written atomically. A cache hit sets the entry's modification
time to now: that time is the entry's "last used". After each write the cache is
pruned to its cap (``cache_max_gb``, else ``$XROSS_CACHE_MAX_GB``, else 20; in GiB,
2**30 bytes) by removing the least recently used entries, never the one just written.
Only entries are counted and removed: torchvision's downloads (``cifar10/``,
``cifar100/``) and any other folder in the cache directory are left alone.

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> data = ImageTensors(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["cat", "dog"])
>>> CacheEntry.of(root, "cifar10", "test", None, None, 0).write(data, max_bytes=max_cache_bytes(1))
>>> [(entry.path.name[:13], entry.bytes > 0) for entry in cache_info(root)]
[('cifar10-test-', True)]
>>> clear_cache(root) > 0, cache_info(root)
(True, [])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from surgery.core.util import TMP_MARK, atomic_write, atomic_write_text
from xross.data.decode import ImageTensors
from xross.data.sources import Split, split_names
from xross.errors import XrossError

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_CACHE_MAX_GB",
    "CacheEntry",
    "CachedSplit",
    "cache_info",
    "clear_cache",
    "default_cache_dir",
    "human_bytes",
    "max_cache_bytes",
    "prune_cache",
]

CACHE_FORMAT = 1  # bump when the decoded result of the same inputs changes
DEFAULT_CACHE_MAX_GB = 20.0
_GIB = 1 << 30
_TENSORS, _META = ".safetensors", ".json"
_ENTRY_FILE = re.compile(r"(?P<stem>.+-[0-9a-f]{20})(?P<suffix>\.safetensors|\.json)")


def default_cache_dir() -> Path:
    """``$XROSS_CACHE``, else ``~/.cache/xross``."""
    return Path(os.environ.get("XROSS_CACHE") or Path.home() / ".cache" / "xross")


def max_cache_bytes(max_gb: float | None = None) -> int:
    """The cache's size cap in bytes: ``max_gb`` GiB, else ``$XROSS_CACHE_MAX_GB``, else 20 GiB.

    >>> max_cache_bytes(0.5)
    536870912
    """
    where, value = f"cache_max_gb={max_gb}", max_gb
    if value is None:
        text = os.environ.get("XROSS_CACHE_MAX_GB", "").strip()
        where, value = f"XROSS_CACHE_MAX_GB={text!r}", DEFAULT_CACHE_MAX_GB
        if text:
            try:
                value = float(text)
            except ValueError:
                value = math.nan
    if not math.isfinite(value) or value < 0:
        raise XrossError(f"{where} is not a cache size; give a number of GiB >= 0, e.g. {DEFAULT_CACHE_MAX_GB:g}")
    return int(value * _GIB)


def human_bytes(n: float) -> str:
    """A size in binary units: ``human_bytes(3 << 20) == '3.0 MiB'``."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------- one entry


@dataclass
class CacheEntry:
    """The two files of one cached split: tensors (safetensors) and metadata (JSON, written last)."""

    tensors: Path
    meta: Path
    key: dict[str, Any]

    @classmethod
    def of(
        cls, root: Path, origin: str | Path, split: Split, subset: int | None, image_size: int | None, seed: int
    ) -> CacheEntry:
        """The entry of a split (or of the first of candidate splits an archive has): its key hashes the source
        (path, size, mtime), the options and the format."""
        key = {
            "format": CACHE_FORMAT,
            "source": str(origin),
            "stamp": _stamp(origin, split),
            "split": split if isinstance(split, str) else list(split),
            "subset": subset,
            "image_size": image_size,
            "seed": seed if subset is not None else None,  # the seed only picks the subset
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        stem = f"{Path(origin).name if isinstance(origin, Path) else origin}-{'-'.join(split_names(split))}-{digest}"
        return cls(root / f"{stem}{_TENSORS}", root / f"{stem}{_META}", key)

    def read(self) -> ImageTensors | None:
        """The cached split (marked as used now), or None when absent or unreadable (then with a warning)."""
        if not self.meta.is_file():
            return None
        try:
            meta = json.loads(self.meta.read_text())
            tensors = load_file(self.tensors)
            split = meta.get("split", self.key["split"])  # entries before the split was recorded name one
            data = ImageTensors(tensors["images"], tensors["labels"], list(meta["classes"]), str(split))
            _check_cached(data, meta, self.key)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            warnings.warn(f"decoded-data cache {self.tensors} is unreadable ({e}); rebuilding it", stacklevel=3)
            return None
        for path in (self.tensors, self.meta):
            try:
                os.utime(path)
            except OSError:
                pass  # a read-only cache still serves hits; it only cannot order them
        return data

    def write(self, data: ImageTensors, max_bytes: int) -> None:
        """Store ``data`` atomically, then prune the cache to ``max_bytes``; a failure only warns."""
        meta = {"key": self.key, "classes": data.classes, "count": len(data), "split": data.split}
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
            return
        try:
            prune_cache(self.tensors.parent, max_bytes, keep=self.tensors)
        except OSError as e:
            warnings.warn(f"cannot prune the decoded-data cache in {self.tensors.parent} ({e})", stacklevel=3)


def _stamp(origin: str | Path, split: Split) -> list[int]:
    """What changes when the source changes: size and mtime of a file, newest folder mtime of a directory."""
    if isinstance(origin, str):
        return []
    if origin.is_file():
        stat = origin.stat()
        return [stat.st_size, stat.st_mtime_ns]
    split_dir = origin / split_names(split)[0]  # a directory's split is resolved before its entry
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


# --------------------------------------------------------------------------- the whole cache


@dataclass(frozen=True)
class CachedSplit:
    """One entry of the cache: its ``.safetensors`` file (the ``.json`` sits beside it), size, last use."""

    path: Path
    bytes: int  # both files together
    last_used: float  # seconds since the epoch: when it was last written or read

    @property
    def files(self) -> tuple[Path, Path]:
        """Its metadata and tensors files, in the order they are removed."""
        stem = self.path.name[: -len(_TENSORS)]
        return self.path.with_name(stem + _META), self.path


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if root.exists() and not root.is_dir():
        raise XrossError(f"cache directory '{root}' is a file; pass a directory (or set XROSS_CACHE to one)")
    return root


def cache_info(cache_dir: str | os.PathLike | None = None) -> list[CachedSplit]:
    """The entries of the cache (default ``$XROSS_CACHE`` or ``~/.cache/xross``), least recently used first.

    A missing directory is an empty cache. Incomplete entries (one of the two files) count too.
    """
    root = _cache_root(cache_dir)
    if not root.is_dir():
        return []
    found: dict[str, list[os.stat_result]] = {}
    for path in root.iterdir():
        match = _ENTRY_FILE.fullmatch(path.name)
        if match is None:
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        if S_ISREG(stat.st_mode):
            found.setdefault(match["stem"], []).append(stat)
    entries = [
        CachedSplit(root / f"{stem}{_TENSORS}", sum(s.st_size for s in stats), max(s.st_mtime for s in stats))
        for stem, stats in found.items()
    ]
    return sorted(entries, key=lambda entry: (entry.last_used, entry.path.name))


def prune_cache(cache_dir: str | os.PathLike | None, max_bytes: int, keep: Path | None = None) -> list[CachedSplit]:
    """Remove least recently used entries until the cache holds at most ``max_bytes``; returns those removed.

    The entry whose ``.safetensors`` file is ``keep`` stays even when it alone exceeds the cap.
    """
    entries = cache_info(cache_dir)
    total = sum(entry.bytes for entry in entries)
    removed = []
    for entry in entries:
        if total <= max_bytes:
            break
        if keep is not None and entry.path == keep:
            continue
        _remove(entry)
        total -= entry.bytes
        removed.append(entry)
    return removed


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Remove every entry of the cache and the leftovers of interrupted writes; returns the bytes freed.

    Torchvision's downloads and other folders in the cache directory stay.
    """
    root = _cache_root(cache_dir)
    freed = 0
    for entry in cache_info(root):
        _remove(entry)
        freed += entry.bytes
    if root.is_dir():
        for path in root.iterdir():  # ".<entry file>.tmp-<pid>-..." of a killed writer
            name = path.name
            if name.startswith(".") and TMP_MARK in name and _ENTRY_FILE.fullmatch(name[1 : name.index(TMP_MARK)]):
                try:
                    size = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:  # its writer finished or gave up meanwhile
                    continue
                freed += size
    return freed


def _remove(entry: CachedSplit) -> None:
    """Delete an entry's files, metadata first: a reader then sees no entry rather than a broken one."""
    for path in entry.files:
        path.unlink(missing_ok=True)
