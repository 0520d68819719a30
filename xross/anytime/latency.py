"""The latency table of a run: every network piece (or width-resolution setting) timed on this machine.

``xross profile RUN`` measures each entry (median of ``repeats`` timed calls after warm-up, at
batch 1 and at a larger batch, and the interquartile range of those calls), with its FLOPs and
parameters, and saves ``RUN/latency.json``. The table records the device it was measured on (a
table from another device is measured again) and the CPU load when it was measured. Each path of
a cohort, a distillation's student and each width-resolution setting of a mutualnet run is one
entry, named as in the run's ``eval.json``.

Figures from a busy machine mislead whoever acts on them (``xross best --max-latency``, the
any-time runner): an entry is *unsteady* when its spread exceeds :data:`SPREAD_LIMIT` of its
median or when one image takes longer than a batch of them; the table is *busy* when the load
average per core exceeded :data:`BUSY_LOAD` as timing began. Reading such a table prints one
warning line; ``xross profile`` marks the entries. Files written before the spread was recorded
(no ``iqr_*``, no ``cpu_load``) load as before and raise no warning.

>>> import torch
>>> entry = measure(torch.nn.Conv2d(3, 8, 3), torch.zeros(1, 3, 32, 32), batch=4, repeats=3)
>>> entry.ms_batch1 > 0 and entry.iqr_batch1 >= 0 and entry.flops == 2 * 8 * 3 * 9 * 30 * 30
True
>>> LatencyEntry(ms_batch1=9.0, ms_batch=2.0, batch=32, flops=1, params=1).unsteady()
'batch 1 slower than batch 32'
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.core.schema import FileModel, Float, parse, read_json_file
from surgery.core.util import atomic_write_text, evaluating
from surgery.graph.flops import count_flops, count_params
from xross.cohort.exits import feature, head_key
from xross.cohort.grid import Cohort, adapter_key, call_part
from xross.errors import XrossError
from xross.run.directory import run_config
from xross.run.table import kind_of

LATENCY_FILE = "latency.json"
SPREAD_LIMIT = 0.25  # an entry whose interquartile range exceeds this share of its median is unsteady
BUSY_LOAD = 0.5  # a 1-minute load average per core above this as timing begins: the machine was busy


class LatencyEntry(FileModel):
    """One timed module: milliseconds per call at batch 1 and at ``batch`` (median of the repeats) with the
    interquartile range of the repeats, FLOPs per image, parameters."""

    ms_batch1: Float = Field(ge=0)
    ms_batch: Float = Field(ge=0)
    batch: PositiveInt
    flops: NonNegativeFloat
    params: NonNegativeInt
    iqr_batch1: Float | None = Field(None, ge=0)  # None in files written before the spread was recorded
    iqr_batch: Float | None = Field(None, ge=0)

    def spread(self) -> float | None:
        """The larger interquartile range of the two batch sizes, as a share of its median."""
        if self.iqr_batch1 is None or self.iqr_batch is None:
            return None
        return max(self.iqr_batch1 / max(self.ms_batch1, 1e-9), self.iqr_batch / max(self.ms_batch, 1e-9))

    def unsteady(self) -> str | None:
        """Why these figures should not be trusted (None when they look sound)."""
        spread = self.spread()
        if spread is not None and spread > SPREAD_LIMIT:
            return f"spread {spread:.0%} of the median"
        if self.batch > 1 and self.ms_batch1 > (1 + SPREAD_LIMIT) * self.ms_batch:  # one image, slower than many
            return f"batch 1 slower than batch {self.batch}"
        return None


class LatencyTable(FileModel):
    """``latency.json``: entries by network name (a path's, a student's, a setting's ``0.5-24``) and the device."""

    format_version: Literal[1] = 1
    device: str
    entries: dict[str, LatencyEntry]
    cpu_load: Float | None = Field(None, ge=0)  # 1-minute load average per core as timing began, if known

    def caveat(self, run: Path | str = "RUN") -> str | None:
        """One line saying why the table's figures should not be trusted, or None when they look sound."""
        unsteady = [name for name, entry in self.entries.items() if entry.unsteady()]
        reasons = []
        if self.cpu_load is not None and self.cpu_load > BUSY_LOAD:
            reasons.append(f"the machine was busy (load {self.cpu_load:.2f} per core as timing began)")
        if unsteady:
            reasons.append(
                f"{len(unsteady)} of {len(self.entries)} entries are unsteady (e.g. {unsteady[0]}: "
                f"{self.entries[unsteady[0]].unsteady()})"
            )
        if not reasons:
            return None
        return (
            f"latency figures of {run} are unreliable: {'; '.join(reasons)}; measure again on an idle machine "
            f"with `xross profile {run}`"
        )

    def save(self, run: Path) -> None:
        atomic_write_text(run / LATENCY_FILE, self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, run: Path) -> LatencyTable:
        fix = f"run `xross profile {run}` again"
        try:
            data = read_json_file(
                run / LATENCY_FILE,
                missing=f"'{run}' has no {LATENCY_FILE}; measure it with `xross profile {run}`",
                fix=fix,
            )
            return parse(cls, data, str(run / LATENCY_FILE), fix=fix)
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


def cpu_load() -> float | None:
    """The 1-minute load average per core, where the system tells it."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):  # not on Windows
        return None


def median_iqr(times: list[float]) -> tuple[float, float]:
    """The median of the timed calls and their interquartile range.

    >>> median_iqr([1.0, 2.0, 3.0, 4.0, 100.0])
    (3.0, 2.0)
    """
    if len(times) < 2:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q3 - q1


def _time_ms(module: nn.Module, args: tuple[Any, ...], repeats: int) -> tuple[float, float]:
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)

    def call() -> None:
        module(*args)
        if cuda:
            torch.cuda.synchronize()

    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return median_iqr(times)


def _batched(example: Any, batch: int) -> tuple[Any, ...]:
    """The call's arguments with every batch-first tensor cut to one sample, or repeated to ``batch`` samples."""
    args = example if isinstance(example, tuple) else (example,)
    size = next(a.shape[0] for a in args if isinstance(a, torch.Tensor))

    def resize(a: Any) -> Any:
        if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != size:
            return a
        return a[:1].expand(batch, *a.shape[1:]).contiguous()

    return tuple(resize(a) for a in args)


@torch.no_grad()
def measure(module: nn.Module, example: Any, batch: int = 32, repeats: int = 10) -> LatencyEntry:
    """Time ``module`` on ``example`` (a tensor or a tuple of arguments; one sample's worth, batch 1) and on
    ``batch`` copies of it."""
    one, many = _batched(example, 1), _batched(example, batch)
    with evaluating(module):
        return _entry(module, _time_ms(module, one, repeats), _time_ms(module, many, repeats), batch, one)


def _entry(
    module: nn.Module, one: tuple[float, float], many: tuple[float, float], batch: int, args: tuple[Any, ...]
) -> LatencyEntry:
    """The entry of ``module`` timed at (median, IQR) ``one`` (batch 1) and ``many`` (``batch``), called on ``args``."""
    return LatencyEntry(
        ms_batch1=one[0],
        iqr_batch1=one[1],
        ms_batch=many[0],
        iqr_batch=many[1],
        batch=batch,
        flops=count_flops(module, *args),
        params=count_params(module),
    )


SPREAD_NOTE = (
    "median of {repeats} timed calls; spread: their interquartile range over the median, the larger of the two "
    f"batch sizes; ! marks an unsteady entry (spread over {SPREAD_LIMIT:.0%}, or batch 1 slower than the batch)"
)


def spread_text(entry: LatencyEntry) -> str:
    """An entry's spread for a table: ``'4%'``, ``'38% !'`` when unsteady, ``'-'`` when not recorded."""
    spread = entry.spread()
    text = "-" if spread is None else f"{spread:.0%}"
    return f"{text} !" if entry.unsteady() else text


def warn_if_unreliable(table: LatencyTable, run: Path | str) -> None:
    """One warning line on stderr when the table's figures should not be trusted (see :meth:`LatencyTable.caveat`)."""
    caveat = table.caveat(run)
    if caveat:
        print(f"warning: {caveat}", file=sys.stderr)


def batch1_ms(run: Path) -> dict[str, float] | None:
    """Batch-1 milliseconds per network name from the run's latency table (warning when it is unreliable);
    None if it has none."""
    if not (run / LATENCY_FILE).is_file():
        return None
    table = LatencyTable.load(run)
    warn_if_unreliable(table, run)
    return {name: e.ms_batch1 for name, e in table.entries.items()}


def profile_run(
    run: Path, batch: int = 32, repeats: int = 10, *, trust_code: bool = False, verify: bool = True
) -> LatencyTable:
    """Time every network of a run on the CPU: each path of a cohort, a distillation's student, or each
    width-resolution setting of a mutualnet run (named as in its ``eval.json``)."""
    kind = kind_of(run_config(run))  # what a run's networks are is its kind's to say (xross.anytime.kinds)
    load = cpu_load()
    cfg, model = kind.load(run, trust_code=trust_code, verify=verify)
    entries = kind.profile(cfg, model, batch, repeats)
    return LatencyTable(device=device_name(torch.device("cpu")), entries=entries, cpu_load=load)


def part_entry(net: int, part: int) -> str:
    return f"part_n{net}_p{part}"


def adapter_entry(boundary: int, src: int, dst: int) -> str:
    return f"adapter_{adapter_key(boundary, src, dst)}"


def exit_entry(net: int, boundary: int) -> str:
    return f"exit_{head_key(net, boundary)}"


def _chain_ms(cohort: Cohort, net: int, x: Any, repeats: int) -> dict[str, tuple[float, float]]:
    """Median ms (and interquartile range) of each part of net ``net``, and of the adapters and exit head
    after each, timed *in a run of the net*: every repeat runs the whole chain, so each piece meets the
    caches the pieces before it left (timing one piece alone, over and over, finds it faster than it is
    in a route)."""
    cuda = isinstance(x, torch.Tensor) and x.is_cuda
    times: dict[str, list[float]] = {}

    def timed(name: str, module: nn.Module, value: Any) -> Any:
        start = time.perf_counter()
        out = call_part(module, value)
        if cuda:
            torch.cuda.synchronize()
        times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out

    for _ in range(repeats + 1):  # the first round warms up
        value = x
        for p in range(cohort.num_parts):
            value = timed(part_entry(net, p), cohort.part(net, p), value)
            if p == cohort.num_parts - 1:
                break
            for j in range(cohort.num_nets):
                ad = cohort.adapter(p, net, j)
                if ad is not None:
                    timed(adapter_entry(p, net, j), ad, value)
            if cohort.exits is not None:
                timed(exit_entry(net, p), cohort.exits.head(net, p), feature(value))
    return {name: median_iqr(t[1:]) for name, t in times.items()}


@torch.no_grad()
def piece_entries(cohort: Cohort, x: torch.Tensor, batch: int, repeats: int) -> dict[str, LatencyEntry]:
    """Every part, adapter and exit head of a cohort (``part_n0_p1``, ``adapter_b0_0to1``, ``exit_n0_b0``),
    timed within runs of its net at batch 1 and at ``batch``, with FLOPs and parameters."""
    entries = {}
    with evaluating(cohort):
        for i in range(cohort.num_nets):
            one = _chain_ms(cohort, i, x[:1], repeats)
            many = _chain_ms(cohort, i, x[:1].expand(batch, *x.shape[1:]).contiguous(), repeats)
            value: Any = x[:1]
            for p in range(cohort.num_parts):
                modules = {part_entry(i, p): (cohort.part(i, p), value)}
                value = call_part(cohort.part(i, p), value)
                if p < cohort.num_parts - 1:
                    for j in range(cohort.num_nets):
                        adapter = cohort.adapter(p, i, j)
                        if adapter is not None:
                            modules[adapter_entry(p, i, j)] = (adapter, value)
                    if cohort.exits is not None:
                        modules[exit_entry(i, p)] = (cohort.exits.head(i, p), feature(value))
                for name, (module, arg) in modules.items():
                    entries[name] = _entry(
                        module, one[name], many[name], batch, arg if isinstance(arg, tuple) else (arg,)
                    )
    return entries


def latency_table(
    run: str | Path, batch: int = 32, repeats: int = 10, *, trust_code: bool = False, verify: bool = True
) -> LatencyTable:
    """The run's latency table: the saved one if it was measured on this device, else measured now and saved."""
    run = Path(run)
    if (run / LATENCY_FILE).is_file():
        table = LatencyTable.load(run)
        if table.device == device_name(torch.device("cpu")):
            warn_if_unreliable(table, run)
            return table
        print(f"note: {run}/{LATENCY_FILE} was measured on {table.device}; measuring again here", file=sys.stderr)
    table = profile_run(run, batch, repeats, trust_code=trust_code, verify=verify)
    table.save(run)
    warn_if_unreliable(table, run)
    return table
