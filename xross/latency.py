"""The latency table of a run: every network piece (or width-resolution setting) timed on this machine.

``xross profile RUN`` measures each entry (median of ``repeats`` timed calls after warm-up, at
batch 1 and at a larger batch), with its FLOPs and parameters, and saves ``RUN/latency.json``.
The table records the device it was measured on; a table from another device is measured again.
Each path of a cohort, a distillation's student and each width-resolution setting of a mutualnet
run is one entry, named as in the run's ``eval.json``.

>>> import torch
>>> entry = measure(torch.nn.Conv2d(3, 8, 3), torch.zeros(1, 3, 32, 32), batch=4, repeats=3)
>>> entry.ms_batch1 > 0 and entry.flops == 2 * 8 * 3 * 9 * 30 * 30
True
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt
from torch import nn

from surgery._util import atomic_write_text, evaluating, first_line
from surgery.errors import SurgeryError
from surgery.flops import count_flops, count_params
from surgery.schema import FileModel, Float, parse
from xross.errors import XrossError
from xross.mutualnet import setting_name
from xross.run import DTYPES, is_distill_run, is_mutualnet_run, load_run, load_slim, load_student, run_config

LATENCY_FILE = "latency.json"


class LatencyEntry(FileModel):
    """One timed module: milliseconds per call at batch 1 and at ``batch``, FLOPs per image, parameters."""

    ms_batch1: Float = Field(ge=0)
    ms_batch: Float = Field(ge=0)
    batch: PositiveInt
    flops: NonNegativeFloat
    params: NonNegativeInt


class LatencyTable(FileModel):
    """``latency.json``: entries by network name (a path's, a student's, a setting's ``0.5-24``) and the device."""

    format_version: Literal[1] = 1
    device: str
    entries: dict[str, LatencyEntry]

    def save(self, run: Path) -> None:
        atomic_write_text(run / LATENCY_FILE, self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, run: Path) -> LatencyTable:
        path = run / LATENCY_FILE
        if not path.is_file():
            raise XrossError(f"'{run}' has no {LATENCY_FILE}; measure it with `xross profile {run}`")
        try:
            return parse(cls, json.loads(path.read_bytes()), str(path), fix=f"run `xross profile {run}` again")
        except (OSError, ValueError) as e:
            raise XrossError(f"cannot read {path}: {first_line(e)}; run `xross profile {run}` again") from None
        except SurgeryError as e:
            raise XrossError(str(e)) from None

    def total_ms(self, names: list[str]) -> float:
        """Batch-1 latency of a chain of entries (a path's pieces), in ms."""
        return sum(self.entries[n].ms_batch1 for n in names)


def device_name(device: torch.device) -> str:
    """What the table was measured on: the CUDA device's name, or the CPU's and the thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()} threads"


def _time_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    def call() -> None:
        module(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure(module: nn.Module, example: torch.Tensor, batch: int = 32, repeats: int = 10) -> LatencyEntry:
    """Time ``module`` on ``example`` (one image's worth, batch 1) and on ``batch`` copies of it."""
    one = example[:1]
    many = one.expand(batch, *one.shape[1:]).contiguous()
    with evaluating(module):
        return LatencyEntry(
            ms_batch1=_time_ms(module, one, repeats),
            ms_batch=_time_ms(module, many, repeats),
            batch=batch,
            flops=count_flops(module, one),
            params=count_params(module),
        )


def batch1_ms(run: Path) -> dict[str, float] | None:
    """Batch-1 milliseconds per network name from the run's latency table; None if it has none."""
    if not (run / LATENCY_FILE).is_file():
        return None
    return {name: e.ms_batch1 for name, e in LatencyTable.load(run).entries.items()}


def profile_run(
    run: Path, batch: int = 32, repeats: int = 10, *, trust_code: bool = False, verify: bool = True
) -> LatencyTable:
    """Time every network of a run on the CPU: each path of a cohort, a distillation's student, or each
    width-resolution setting of a mutualnet run (named as in its ``eval.json``)."""
    cfg = run_config(run)
    dtype = DTYPES[cfg.dtype]

    def image(size: int) -> torch.Tensor:
        return torch.zeros(1, 3, size, size, dtype=dtype)

    entries = {}
    if is_mutualnet_run(run):
        _, slim = load_slim(run, trust_code=trust_code, verify=verify)
        widths, resolutions = cfg.grid()  # type: ignore[union-attr]
        for w in widths:
            net = slim.extract(w)
            for r in resolutions:
                entries[setting_name(w, r)] = measure(net, image(r), batch, repeats)
    elif is_distill_run(run):
        dcfg, student = load_student(run, trust_code=trust_code, verify=verify)
        entries[dcfg.student] = measure(student, image(cfg.image_size or 32), batch, repeats)
    else:
        _, cohort = load_run(run, trust_code=trust_code, verify=verify)
        for p in cohort.paths():
            entries[cohort.path_name(p)] = measure(cohort.export_path(p), image(cfg.image_size or 32), batch, repeats)
    return LatencyTable(device=device_name(torch.device("cpu")), entries=entries)
