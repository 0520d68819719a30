"""The suite's memory: what conftest.py frees after each test, and a probe recording each test's.

After each test conftest.py calls :func:`release` (collect its reference cycles, hand freed heap
back), and after a module's last test :func:`clear_caches` (the module's own memoised models).

The probe (:class:`MemoryProbe`, for ``bench/suite_memory.py``) is loaded by conftest.py when
``SUITE_MEMORY=<folder>`` is set. Each process running tests (the main one, or each xdist
worker ``gw0``, ``gw1``, ...) appends one JSON line per test to ``<folder>/<worker>.jsonl``:
``{"test", "rss_before", "rss_after", "peak", "seconds", "released_s"}``, memory in bytes.
``rss_*`` is the process's resident set around the test (``/proc/self/statm``, what is held),
``peak`` its high-water mark after the test (``ru_maxrss``, what the machine had to have),
``released_s`` the seconds spent in :func:`release` so far. Lines are written as tests finish,
so a run that is killed still leaves its figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import resource
import time
from collections.abc import Callable, Generator
from pathlib import Path

import pytest

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak() -> int:
    """This process's peak resident set size so far, in bytes (Linux gives ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _libc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a C library without it."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _libc_trim()
RELEASE_SECONDS = [0.0]  # time spent in release() so far, reported by the probe
RELEASE_ABOVE = 256 * 2**20  # release() collects once the resident set has grown by this much (bytes)
_HELD = [0]  # the lowest resident set since the last collection (bytes)


def freeze() -> None:
    """Collect once, then leave everything alive now (imports, collected tests) out of later collections.

    What is alive after collection lives for the whole session, and scanning it is what a
    collection costs (~0.5 s with torch, transformers and timm loaded); frozen, a
    collection after a test only looks at what was made since.
    """
    gc.collect()
    gc.freeze()
    _HELD[0] = rss()


def release() -> None:
    """Free what the last test left in reference cycles and hand the freed heap back to the system.

    A traced or grown model is a cycle (GraphModule <-> Graph <-> Node), so it outlives its test
    until the collector's oldest generation runs, and glibc keeps freed heap pages mapped:
    without this, a worker's resident set climbs by GBs over the model-heavy test modules.
    A collection still takes 0.1-1.5 s with the session's objects frozen (:func:`freeze`), so it
    runs only when the resident set is :data:`RELEASE_ABOVE` over its low since the last one:
    most tests build small models and leave nothing worth that.
    """
    now = rss()
    if now < _HELD[0] + RELEASE_ABOVE:
        _HELD[0] = min(_HELD[0], now)
        return
    start = time.perf_counter()
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    _HELD[0] = rss()
    RELEASE_SECONDS[0] += time.perf_counter() - start


def clear_caches(module: object) -> None:
    """Empty the ``functools`` caches a test module defines (models it memoised for its own tests)."""
    for value in vars(module).values():
        if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", None) == getattr(
            module, "__name__", None
        ):
            value.cache_clear()


class MemoryProbe:
    """Appends a line per test to ``<folder>/<worker>.jsonl``."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.file = (folder / f"{worker}.jsonl").open("a", buffering=1)

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        """Measure around setup, call and teardown of one test."""
        before, start = rss(), time.perf_counter()
        yield
        line = {
            "test": item.nodeid,
            "rss_before": before,
            "rss_after": rss(),
            "peak": peak(),
            "seconds": round(time.perf_counter() - start, 3),
            "released_s": round(RELEASE_SECONDS[0], 3),
        }
        self.file.write(json.dumps(line) + "\n")

    def pytest_unconfigure(self) -> None:
        """Close the file."""
        self.file.close()


def register(config: pytest.Config) -> None:
    """Register the probe when ``$SUITE_MEMORY`` names a folder."""
    folder = os.environ.get("SUITE_MEMORY")
    if folder:
        config.pluginmanager.register(MemoryProbe(Path(folder)), "memory_probe")
