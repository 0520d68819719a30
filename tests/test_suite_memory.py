"""The suite's own memory keeping (tests/memory_probe.py) and its report (bench/suite_memory.py).

After a test, memory a reference cycle still holds is collected and handed back once it is worth
it; a finished module's own memoised models are dropped, not those of the modules it imports;
the report gives each worker's peak and names the tests that raised it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import types
import weakref
from pathlib import Path

import memory_probe
import pytest
import torch

from surgery.models.build import list_models

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


@pytest.fixture(autouse=True)
def _no_automatic_collection():
    """Only release() collects during these tests (an automatic collection would free the cycles first)."""
    gc.disable()
    yield
    gc.enable()


class _Cycle:
    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.me = tensor, self


def test_release_frees_a_cycle_holding_a_large_tensor_and_returns_its_memory(monkeypatch) -> None:
    monkeypatch.setattr(memory_probe, "_HELD", [memory_probe.rss()])
    big = torch.ones(512 * MB // 4)  # 512 MB, over the 256 MB that makes a collection worth it
    gone = weakref.ref(big)
    _Cycle(big)
    del big
    held = memory_probe.rss()
    assert gone() is not None, "only a collection frees the cycle"
    memory_probe.release()
    assert gone() is None
    assert memory_probe.rss() < held - 400 * MB


def test_release_skips_the_collection_while_little_is_held(monkeypatch) -> None:
    monkeypatch.setattr(memory_probe, "_HELD", [memory_probe.rss()])
    small = torch.ones(1024)
    gone = weakref.ref(small)
    _Cycle(small)
    del small
    memory_probe.release()
    assert gone() is not None  # left for the next collection: not worth a collection now


def test_clear_caches_empties_the_modules_own_caches_only() -> None:
    module = types.ModuleType("a_test_module")
    exec("import functools\n@functools.lru_cache(maxsize=2)\ndef model(n):\n    return [n]\n", vars(module))
    vars(module)["list_models"] = list_models  # imported from surgery: its cache is not the module's
    module.model(1), list_models()
    memory_probe.clear_caches(module)
    assert module.model.cache_info().currsize == 0
    assert list_models.cache_info().currsize == 1


def _line(test: str, before: int, after: int, peak: int) -> str:
    return json.dumps(
        {"test": test, "rss_before": before * MB, "rss_after": after * MB, "peak": peak * MB, "seconds": 1}
    )


def test_the_report_gives_each_workers_peak_and_the_tests_that_raised_it(tmp_path: Path) -> None:
    (tmp_path / "gw0.jsonl").write_text(
        "\n".join([_line("a", 900, 1000, 1024), _line("big", 1000, 1100, 3072), _line("c", 1100, 1024, 3072)])
    )
    (tmp_path / "gw1.jsonl").write_text(_line("d", 800, 2048, 2048))
    (tmp_path / "main.jsonl").write_text("")  # xdist's controller runs no tests
    out = subprocess.run(
        [sys.executable, "bench/suite_memory.py", "--report", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures = json.loads(out.splitlines()[-1])
    assert figures == {
        "workers": {
            "gw0": {"peak_gb": 3.0, "final_gb": 1.0, "tests": 3},
            "gw1": {"peak_gb": 2.0, "final_gb": 2.0, "tests": 1},
        },
        "max_peak_gb": 3.0,
    }
    raised = out.split("raised a worker's peak most")[1].split("\n")[1:3]
    assert raised[0].split() == ["+", "2048", "gw0", "3.00", "GB", "1.0", "s", "big"]  # the first test raises none
    assert raised[1] == ""  # and gw1's only test neither


def test_the_probe_is_on_only_when_asked(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.has_plugin("memory_probe") == bool(os.environ.get("SUITE_MEMORY"))
