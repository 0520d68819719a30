"""The decoded-data cache's size cap (least recently used entries go first), cache_info, clear_cache, `xross cache`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xross.data.sources
from xross.data import CachedSplit, cache_info, clear_cache, load_split
from xross.data.cache import CacheEntry, max_cache_bytes
from xross.errors import XrossError

GIB = 1 << 30


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two classes of eight 16x16 PNGs: a subset of 4 chosen by seed s is one cache entry per seed."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / "train" / cls / f"{i}.png")
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def _no_cap_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XROSS_CACHE_MAX_GB", raising=False)


def entry_of(folder: Path, cache: Path, seed: int) -> Path:
    """The ``.safetensors`` file of the entry of ``load_split(folder, subset=4, seed=seed)``."""
    return CacheEntry.of(cache, xross.data.sources.resolve_source(folder), "train", 4, None, seed).tensors


def load(folder: Path, cache: Path, seed: int, **kw: object) -> None:
    load_split(folder, subset=4, seed=seed, cache_dir=cache, progress=False, **kw)


def set_last_used(entry: Path, seconds: float) -> None:
    for path in (entry, entry.with_name(entry.name.replace(".safetensors", ".json"))):
        os.utime(path, (seconds, seconds))


def names(entries: list[CachedSplit]) -> list[str]:
    return [entry.path.name for entry in entries]


def test_cap_removes_the_least_recently_used_entries(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a, b, c, d = (entry_of(folder, cache, seed) for seed in range(4))
    for seed in range(3):
        load(folder, cache, seed)
    for entry, seconds in ((a, 1000), (b, 2000), (c, 3000)):
        set_last_used(entry, seconds)
    assert names(cache_info(cache)) == [a.name, b.name, c.name]
    load(folder, cache, 0)  # a hit: a becomes the most recently used
    assert names(cache_info(cache)) == [b.name, c.name, a.name]
    size = cache_info(cache)[0].bytes
    assert size == b.stat().st_size + b.with_name(b.name.replace(".safetensors", ".json")).stat().st_size

    load(folder, cache, 3, cache_max_gb=2.5 * size / GIB)  # room for two entries: b and c go

    assert names(cache_info(cache)) == [a.name, d.name]
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [a.name, d.name, a.name.replace(".safetensors", ".json"), d.name.replace(".safetensors", ".json")]
    )


def test_the_entry_just_written_stays_even_over_the_cap(folder: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    load(folder, cache, 0)
    load(folder, cache, 1, cache_max_gb=0)
    assert names(cache_info(cache)) == [entry_of(folder, cache, 1).name]

    def no_decoding(*args: object) -> None:
        raise AssertionError("the kept entry was decoded again")

    monkeypatch.setattr(xross.data.sources, "scan_folder", no_decoding)
    load(folder, cache, 1, cache_max_gb=0)  # still there: a hit


def test_cap_from_the_environment_and_bad_caps(folder: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    assert max_cache_bytes() == 20 * GIB
    monkeypatch.setenv("XROSS_CACHE_MAX_GB", "0")
    assert max_cache_bytes() == 0 and max_cache_bytes(1.5) == 3 * GIB // 2  # the argument wins
    load(folder, cache, 0)
    load(folder, cache, 1)
    assert names(cache_info(cache)) == [entry_of(folder, cache, 1).name]
    monkeypatch.setenv("XROSS_CACHE_MAX_GB", "lots")
    with pytest.raises(XrossError, match=r"XROSS_CACHE_MAX_GB='lots' is not a cache size; give a number of GiB >= 0"):
        load(folder, cache, 2)
    with pytest.raises(XrossError, match=r"cache_max_gb=-1 is not a cache size"):
        load(folder, cache, 2, cache_max_gb=-1)


def test_info_and_clear_touch_only_entries(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert cache_info(cache) == [] and clear_cache(cache) == 0  # a missing directory is an empty cache
    load(folder, cache, 0)
    load(folder, cache, 1)
    (cache / "cifar10").mkdir()  # a torchvision download stays
    (cache / "cifar10" / "data.bin").write_bytes(b"x" * 100)
    (cache / "notes.txt").write_text("mine")
    leftover = cache / f".{entry_of(folder, cache, 2).name}.tmp-123-abc"  # a killed writer's temporary file
    leftover.write_bytes(b"y" * 10)
    entries = cache_info(cache)
    assert len(entries) == 2 and all(entry.last_used > 0 for entry in entries)

    assert clear_cache(cache) == sum(entry.bytes for entry in entries) + 10

    assert cache_info(cache) == []
    assert sorted(p.name for p in cache.iterdir()) == ["cifar10", "notes.txt"]
    with pytest.raises(XrossError, match="is a file"):
        cache_info(cache / "notes.txt")


def test_cache_cli(cli, folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load(folder, cache, 0)
    load(folder, cache, 1)
    r = cli("xross", "cache", "info", "--cache-dir", cache)
    assert r.code == 0, r
    assert f"{cache}: 2 cached splits" in r.out and "of at most 20.0 GiB" in r.out
    assert entry_of(folder, cache, 0).name[:20] in r.out and "last used" in r.out

    r = cli("xross", "cache", "clear", "--cache-dir", cache)
    assert r.code == 0 and f"removed 2 cached splits from {cache}" in r.out, r
    assert cache_info(cache) == []
    r = cli("xross", "cache", "info", "--cache-dir", cache)
    assert r.code == 0 and f"{cache}: 0 cached splits, 0 B" in r.out, r

    r = cli("xross", "cache", "purge", "--cache-dir", cache)
    assert r.code == 2 and "unknown action 'purge'" in r.err and "xross cache clear" in r.err
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("xross", "cache", "info", "--cache-dir", cache / "missing" / "here")
    assert r.code == 0 and "0 cached splits" in r.out, r
