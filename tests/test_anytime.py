"""xross.anytime, xross.budget and xross.anytime_report: the deadline runner on a simulated clock, thresholds
that keep a mean FLOP budget on images they were not calibrated on, and the `xross anytime`/`best` commands."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny

import xross
from xross.anytime.latency import (
    LatencyEntry,
    LatencyTable,
    adapter_entry,
    cpu_load,
    exit_entry,
    measure,
    part_entry,
    spread_text,
)
from xross.anytime.report import AnytimeReport
from xross.anytime.runner import AnytimeRunner, RouteCosts
from xross.cohort.grid import Cohort
from xross.errors import XrossError

PART_MS = {0: [2.0, 3.0, 4.0], 1: [1.0, 1.5, 2.0]}  # net -> ms of each part (net 1 is the cheap one)


def cohort_and_table() -> tuple[Cohort, LatencyTable]:
    """A 3-part cohort of two small VGGs with exits, and a latency table written by hand."""
    torch.manual_seed(0)
    cohort = Cohort.build(
        [tiny([8, 16]), tiny([12, 16])], cuts=["features.0", "features.1"], num_classes=10, image_size=16, exits=True
    ).eval()

    def entry(ms: float) -> LatencyEntry:
        return LatencyEntry(ms_batch1=ms, ms_batch=ms, batch=1, flops=1e6 * ms, params=1)

    entries = {part_entry(n, p): entry(ms) for n, parts in PART_MS.items() for p, ms in enumerate(parts)}
    entries |= {exit_entry(n, b): entry(0.25) for n in (0, 1) for b in (0, 1)}
    entries |= {adapter_entry(b, i, 1 - i): entry(0.5) for b, i in adapters(cohort)}
    return cohort, LatencyTable(device="simulated", entries=entries)


def adapters(cohort: Cohort) -> list[tuple[int, int]]:
    """(boundary, source net) of every adapter the cohort has (none where the two nets' shapes agree)."""
    return [(b, i) for b in (0, 1) for i in (0, 1) if cohort.adapter(b, i, 1 - i) is not None]


class SimulatedClock:
    """Seconds that pass only when a part, adapter or head runs: its table latency times ``slowdown``."""

    def __init__(self, cohort: Cohort, table: LatencyTable, slowdown: float) -> None:
        self.now = 0.0
        names = {part_entry(n, p): cohort.part(n, p) for n in (0, 1) for p in range(3)}
        names |= {exit_entry(n, b): cohort.exits.head(n, b) for n in (0, 1) for b in (0, 1)}
        names |= {adapter_entry(b, i, 1 - i): cohort.adapter(b, i, 1 - i) for b, i in adapters(cohort)}
        for name, module in names.items():
            ms = table.entries[name].ms_batch1 * slowdown
            module.register_forward_hook(lambda *_, ms=ms: self.advance(ms))

    def advance(self, ms: float) -> None:
        self.now += ms / 1e3

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("slowdown", [1.0, 1.6, 3.0])
@pytest.mark.parametrize("deadline", [2.3, 4.0, 6.0, 9.9, 20.0])
def test_the_runner_never_starts_a_part_that_does_not_fit_what_is_left(slowdown: float, deadline: float) -> None:
    cohort, table = cohort_and_table()
    clock = SimulatedClock(cohort, table, slowdown)
    x = torch.randn(1, 3, 16, 16)
    for path in [(0, 0, 0), (1, 1, 1), (1, 0, 0), (0, 1, 0)]:
        costs = RouteCosts.of(path, table)
        if costs.reachable(deadline) is None:
            continue
        answer = AnytimeRunner(cohort, table, deadline_ms=deadline, path=path, clock=clock)(x)
        for stage, left, need in answer.trace[1:]:
            assert costs.step_ms[stage] + costs.exit_ms[stage] <= need <= left
        # only a first part (always run) and its exit may overrun: the runner saw nothing yet to scale by
        assert answer.elapsed_ms <= max(deadline, slowdown * costs.first_exit_ms) + 1e-9
        if slowdown == 1.0:  # on time the runner goes exactly as far as the table says
            assert len(answer.prefix) - 1 == costs.reachable(deadline)
            assert answer.elapsed_ms <= deadline + 1e-9
        if len(answer.trace) > 1 and slowdown > 1.0:  # a slow machine stops no later than a punctual one
            assert len(answer.prefix) - 1 <= costs.reachable(deadline)  # type: ignore[operator]


def test_with_time_to_spare_the_answer_is_the_path_itself_bit_for_bit() -> None:
    cohort, table = cohort_and_table()
    x = torch.randn(2, 3, 16, 16)
    for path in cohort.paths():
        answer = AnytimeRunner(cohort, table, deadline_ms=100.0, path=path, clock=lambda: 0.0)(x)  # no time passes
        assert answer.final and answer.prefix == path
        assert torch.equal(answer.logits, cohort.forward_paths(x, [path])[path])
    early = AnytimeRunner(cohort, table, flops=2.5e6, path=(1, 1, 1))(x)  # a FLOP limit: exit after part 0
    assert early.prefix == (1,) and torch.equal(early.logits, cohort.exits.logits((1,), cohort.part(1, 0)(x)))


def test_a_deadline_below_every_first_exit_names_the_minimum() -> None:
    cohort, table = cohort_and_table()
    with pytest.raises(XrossError, match=r"below the cheapest first exit \(1.25 ms on simulated\); give at least 1.25"):
        AnytimeRunner(cohort, table, deadline_ms=1.0, path=(1, 1, 1))
    accuracy = {p[: k + 1]: float(k) for p in cohort.paths() for k in range(3)}
    chosen = AnytimeRunner(cohort, table, deadline_ms=4.0, accuracy=accuracy)  # the route reaching furthest
    assert chosen.costs.path[:2] == (1, 1)


@pytest.fixture(scope="module")
def exits_run(tmp_path_factory, cifar10_archive: Path, data_cache: Path) -> Path:
    from xross.methods.trainer import train

    out = tmp_path_factory.mktemp("anytime") / "run"
    train(
        nets=["resnet18", "mobilenet_v2"], cuts=["layer1,features.3", "layer3,features.10"], mode="independent",
        exits=True, holdout=300, data=str(cifar10_archive), batch_size=32, epochs=2, lr=1e-3,
        cache_dir=str(data_cache), eval_every=0, out=str(out), progress=False,
    )  # fmt: skip
    return out


@pytest.mark.slow
def test_thresholds_keep_the_mean_budget_on_the_test_split(exits_run: Path, cli) -> None:
    r = cli("xross", "anytime", exits_run, "--budgets", "20,30,40,50,60,70,80,90,100", "--deadlines", "6")
    assert r.code == 0, r
    report = AnytimeReport.load(exits_run)
    assert report.calibration_images == 300 and report.test_images == 200 and report.exits == 4
    kept = [b for b in report.budgets if b.path is not None]
    assert len(kept) >= 7
    for b in kept:
        assert b.mean_flops <= 1.05 * b.budget_flops, b  # calibrated on held-out images, kept on the test split
    assert len(report.deadlines) == 6 and report.deadlines[-1].prefix == report.deadlines[-1].path
    assert {"anytime.json", "anytime.csv", "anytime.png", "latency.json"} <= {p.name for p in exits_run.iterdir()}
    entries = json.loads((exits_run / "latency.json").read_text())["entries"]
    assert {"part_n0_p2", "adapter_b1_0to1", "exit_n1_b1"} <= set(entries)


@pytest.mark.slow
def test_best_answers_for_a_deadline_and_a_mean_budget(exits_run: Path, cli) -> None:
    if not (exits_run / "anytime.json").is_file():
        assert cli("xross", "anytime", exits_run, "--deadlines", "3").code == 0
    r = cli("xross", "best", exits_run, "--mean-flops", "1G")
    assert r.code == 0 and "route" in r.out and "thresholds" in r.out, r
    r = cli("xross", "best", exits_run, "--mean-flops", "1k")
    assert r.code == 2 and "no route meets a mean of" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("xross", "best", exits_run, "--max-latency", "10s")
    assert r.code == 0 and "answering from its end" in r.out, r
    r = cli("xross", "best", exits_run, "--max-latency", "0.001ms")
    errors = [line for line in r.err.strip().splitlines() if not line.startswith("warning: latency figures")]
    assert r.code == 2 and "give at least" in r.err and len(errors) == 1  # (timed on a busy machine: a warning too)

    x = torch.randn(1, 3, 32, 32)
    runner = xross.AnytimeRunner.from_run(exits_run, deadline_ms=1e4)  # time for everything: the best full path
    answer = runner(x)
    assert answer.final and torch.equal(answer.logits, runner.cohort.forward_paths(x, [answer.prefix])[answer.prefix])


class Jittery(torch.nn.Module):
    """A convolution whose every other call waits 20 ms: the timing a busy machine gives."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.calls = torch.nn.Conv2d(3, 4, 3), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.02 if self.calls % 2 else 0.0)
        return self.conv(x)


def test_latency_records_its_spread_and_says_when_it_cannot_be_trusted(tmp_path: Path, monkeypatch) -> None:
    entry = measure(Jittery(), torch.zeros(1, 3, 8, 8), batch=2, repeats=8)
    assert entry.iqr_batch1 >= 15 and entry.iqr_batch >= 15  # half the calls 20 ms slower
    assert entry.unsteady().startswith("spread") and spread_text(entry).endswith(" !")
    # the figures of the issue: 528 ms for one image, 87 ms for 32 of them
    busy = LatencyEntry(ms_batch1=528, ms_batch=87, batch=32, flops=1, params=1, iqr_batch1=1, iqr_batch=1)
    steady = LatencyEntry(ms_batch1=3, ms_batch=40, batch=32, flops=1, params=1, iqr_batch1=0.1, iqr_batch=1)
    assert busy.unsteady() == "batch 1 slower than batch 32" and steady.unsteady() is None
    assert LatencyTable(device="cpu", entries={"a": steady}, cpu_load=0.1).caveat() is None
    caveat = LatencyTable(device="cpu", entries={"a": steady, "b": busy}, cpu_load=1.9).caveat("runs/x")
    assert "busy (load 1.90 per core" in caveat and "1 of 2 entries are unsteady (e.g. b: batch 1 slower" in caveat
    assert "`xross profile runs/x`" in caveat and "\n" not in caveat
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0 * (os.cpu_count() or 1), 0.0, 0.0))
    assert cpu_load() == 3.0
    # a table written before the spread was recorded loads as it was, without a warning
    old = {"format_version": 1, "device": "cpu", "entries": {"a": {"ms_batch1": 1, "ms_batch": 2, "batch": 2,
                                                                    "flops": 1, "params": 1}}}  # fmt: skip
    (tmp_path / "latency.json").write_text(json.dumps(old))
    table = LatencyTable.load(tmp_path)
    assert table.entries["a"].spread() is None and table.caveat() is None and spread_text(table.entries["a"]) == "-"
