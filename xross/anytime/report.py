"""The any-time curves of a run with exit heads: accuracy against a deadline, and against a mean FLOP budget.

``xross anytime RUN`` (:func:`anytime_report`) scores every exit of every route on the run's held-out
training images (the calibration split) and on the test split, then

* for deadlines from the cheapest first exit to the slowest route, picks by calibration accuracy the
  route whose reachable exit (latency table) is best, and reports its test accuracy, next to the best
  *full* path that fits the deadline;
* for budgets of mean FLOPs per image (default 25/50/75/100 % of the costliest path), calibrates each
  route's confidence thresholds (:mod:`xross.anytime.budget`), picks the best route by calibration accuracy,
  and reports its test accuracy and the mean FLOPs it really spent on the test split, next to the best
  full path within the budget;
* optionally runs :class:`xross.anytime.runner.AnytimeRunner` on test images one by one on the wall clock and
  counts answers later than their deadline + 10 %.

Everything lands in ``RUN/anytime.json`` (with every route's operating points, which
``xross best --mean-flops`` reads), ``anytime.csv`` and ``anytime.png``.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeInt, Strict

from surgery.core.errors import SurgeryError
from surgery.core.schema import FileModel, Float, parse, read_json_file
from surgery.core.util import atomic_write_text
from xross.analysis.plots import pyplot, save_png
from xross.anytime.budget import StageRecords, calibrate, collect, stage_costs, thresholds_for
from xross.anytime.latency import LatencyTable
from xross.anytime.runner import (
    AnytimeRunner,
    Plan,
    RouteCosts,
    accuracy_by_prefix,
    check_deadline,
    minimum_deadline,
    plan,
)
from xross.cohort.grid import Cohort, Route
from xross.data import ImageTensors, load_split, split_holdout
from xross.errors import XrossError
from xross.run.config import TrainConfig
from xross.run.directory import as_batches, evaluation_batches
from xross.run.evaluate import EvalResult

ANYTIME_JSON, ANYTIME_CSV, ANYTIME_PNG = "anytime.json", "anytime.csv", "anytime.png"
PathField = Annotated[tuple[Annotated[NonNegativeInt, Strict()], ...], Strict(False)]


class DeadlineRow(FileModel):
    """At one deadline: the route chosen, the exit reached (its prefix), its accuracy; the best full path."""

    deadline_ms: Float
    path: PathField
    prefix: PathField
    calibration_top1: Float
    top1: Float
    table_ms: Float
    full_path: PathField | None
    full_path_top1: Float | None


class BudgetRow(FileModel):
    """At one mean-FLOPs budget: the route and thresholds chosen, test accuracy and mean FLOPs; the best full path."""

    share: Float
    budget_flops: Float
    path: PathField | None
    thresholds: list[Float]
    calibration_top1: Float | None
    top1: Float | None
    mean_flops: Float | None
    full_path: PathField | None
    full_path_top1: Float | None


class OperatingPoint(FileModel):
    """One setting of a route's thresholds: mean FLOPs and top-1 on the calibration and test splits."""

    path: PathField
    thresholds: list[Float]
    calibration_flops: Float
    calibration_top1: Float
    flops: Float
    top1: Float


class AnytimeReport(FileModel):
    """``anytime.json``."""

    format_version: Literal[1] = 1
    device: str
    exits: NonNegativeInt
    routes: NonNegativeInt
    calibration_images: NonNegativeInt
    test_images: NonNegativeInt
    full_path_top1: Float
    deadlines: list[DeadlineRow]
    budgets: list[BudgetRow]
    points: list[OperatingPoint]
    wall_clock_answers: NonNegativeInt = 0
    deadline_violations: NonNegativeInt = 0
    wall_clock_top1: dict[str, Float] = Field(default_factory=dict)
    wall_clock_late: dict[str, NonNegativeInt] = Field(default_factory=dict)

    def save(self, run: Path) -> None:
        atomic_write_text(run / ANYTIME_JSON, self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, run: Path) -> AnytimeReport:
        fix = f"run `xross anytime {run}` again"
        try:
            data = read_json_file(
                run / ANYTIME_JSON,
                missing=f"'{run}' has no {ANYTIME_JSON}; make it with `xross anytime {run}`",
                fix=fix,
            )
            return parse(cls, data, str(run / ANYTIME_JSON), fix=fix)
        except SurgeryError as e:
            raise XrossError(str(e)) from None


def _top1(records: StageRecords, stage: int) -> float:
    return 100.0 * float(records.correct[stage].float().mean())


def prefix_accuracy(records: dict[Route, StageRecords]) -> dict[Route, float]:
    """Top-1 of every exit (by prefix) and every path's final output, from the routes' records."""
    return {p[: k + 1]: _top1(r, k) for p, r in records.items() for k in range(r.num_stages)}


def calibration_split(cfg: TrainConfig) -> ImageTensors | None:
    """Held-out training images and labels of a run (None if it held none out)."""
    if not cfg.holdout:
        return None
    train = load_split(cfg.data, "train", subset=cfg.subset, image_size=cfg.image_size, cache_dir=cfg.cache_dir,
                       seed=cfg.seed)  # fmt: skip
    return split_holdout(train, cfg.holdout, cfg.seed)[1]


def deadline_grid(routes: Sequence[RouteCosts], count: int) -> list[float]:
    """``count`` deadlines spaced geometrically from the cheapest first exit to the slowest route (+5 %)."""
    lo = minimum_deadline(routes)
    hi = 1.05 * max(sum(r.step_ms) for r in routes)
    return [lo * (hi / lo) ** (i / max(count - 1, 1)) for i in range(count)]


def _best_full(
    routes: Sequence[RouteCosts],
    cal: dict[Route, float],
    test: dict[Route, float],
    cost: Callable[[RouteCosts], float],
    limit: float,
) -> tuple[Route | None, float | None]:
    """The full path best on the calibration split among those whose ``cost`` fits ``limit``, and its test top-1."""
    full = [r for r in routes if cost(r) <= limit]
    if not full:
        return None, None
    chosen = max(full, key=lambda r: (cal[r.path], -sum(r.step_ms)))
    return chosen.path, test[chosen.path]


def deadline_rows(
    routes: Sequence[RouteCosts], cal: dict[Route, float], test: dict[Route, float], deadlines: Sequence[float]
) -> list[DeadlineRow]:
    rows = []
    for d in deadlines:
        chosen = plan(routes, cal, deadline_ms=d)
        assert chosen is not None  # every deadline is at least the cheapest first exit
        full, full_top1 = _best_full(routes, cal, test, lambda r: sum(r.step_ms), d)
        rows.append(
            DeadlineRow(
                deadline_ms=d,
                path=chosen.path,
                prefix=chosen.prefix,
                calibration_top1=chosen.accuracy,
                top1=test[chosen.prefix],
                table_ms=chosen.ms,
                full_path=full,
                full_path_top1=full_top1,
            )  # fmt: skip
        )
    return rows


def budget_rows(
    routes: Sequence[RouteCosts],
    cal_records: dict[Route, StageRecords],
    test_records: dict[Route, StageRecords],
    shares: Sequence[float],
) -> list[BudgetRow]:
    cal, test = prefix_accuracy(cal_records), prefix_accuracy(test_records)
    costliest = max(sum(r.step_flops) for r in routes)
    rows = []
    for share in shares:
        budget = share * costliest
        best: tuple[float, Route, list[float]] | None = None
        for r in routes:
            costs = stage_costs(r.step_flops, r.exit_flops)
            thresholds = calibrate(cal_records[r.path], costs, budget)
            if thresholds is not None:
                acc = cal_records[r.path].accuracy(thresholds)
                if best is None or acc > best[0]:
                    best = (acc, r.path, thresholds)
        full, full_top1 = _best_full(routes, cal, test, lambda r: sum(r.step_flops), budget)
        if best is None:
            rows.append(BudgetRow(share=share, budget_flops=budget, path=None, thresholds=[], calibration_top1=None,
                                  top1=None, mean_flops=None, full_path=full, full_path_top1=full_top1))  # fmt: skip
            continue
        acc, path, thresholds = best
        route = next(r for r in routes if r.path == path)
        costs = stage_costs(route.step_flops, route.exit_flops)
        on_test = test_records[path]
        rows.append(
            BudgetRow(
                share=share,
                budget_flops=budget,
                path=path,
                thresholds=thresholds,
                calibration_top1=acc,
                top1=on_test.accuracy(thresholds),
                mean_flops=on_test.mean_cost(thresholds, costs),
                full_path=full,
                full_path_top1=full_top1,
            )  # fmt: skip
        )
    return rows


def operating_points(
    routes: Sequence[RouteCosts],
    cal_records: dict[Route, StageRecords],
    test_records: dict[Route, StageRecords],
    count: int = 25,
) -> list[OperatingPoint]:
    """``count`` threshold settings per route, from every image at the first exit to every image at the end."""
    points = []
    for r in routes:
        costs = stage_costs(r.step_flops, r.exit_flops)
        for i in range(count):
            log_ratio = -12.0 + 24.0 * i / (count - 1)
            t = thresholds_for(cal_records[r.path], log_ratio)
            points.append(
                OperatingPoint(
                    path=r.path,
                    thresholds=t,
                    calibration_flops=cal_records[r.path].mean_cost(t, costs),
                    calibration_top1=cal_records[r.path].accuracy(t),
                    flops=test_records[r.path].mean_cost(t, costs),
                    top1=test_records[r.path].accuracy(t),
                )  # fmt: skip
            )
    return points


def best_point(points: Sequence[OperatingPoint], mean_flops: float) -> OperatingPoint:
    """The operating point with the best calibration accuracy whose calibration mean FLOPs fit ``mean_flops``."""
    fitting = [p for p in points if p.calibration_flops <= mean_flops]
    if not fitting:
        cheapest = min(points, key=lambda p: p.calibration_flops)
        raise XrossError(
            f"no route meets a mean of {mean_flops:.3g} FLOPs per image; the cheapest spends "
            f"{cheapest.calibration_flops:.3g} (route {list(cheapest.path)}, every image at the first exit)"
        )
    return max(fitting, key=lambda p: (p.calibration_top1, -p.calibration_flops))


def deadline_choice(result: EvalResult, table: LatencyTable, deadline_ms: float, flops: float | None = None) -> Plan:
    """The route and exit to use under a deadline (and FLOP limit), by the accuracies of ``eval.json``."""
    accuracy = accuracy_by_prefix(result)
    routes = [RouteCosts.of(r.path, table) for r in result.paths]
    check_deadline(routes, deadline_ms, table.device)
    chosen = plan(routes, accuracy, deadline_ms, flops)
    if chosen is None:
        raise XrossError(f"no route reaches an exit within {flops:g} FLOPs; give a larger budget")
    return chosen


def wall_clock_check(
    cohort: Cohort,
    table: LatencyTable,
    cal: dict[Route, float],
    images: torch.Tensor,
    labels: torch.Tensor,
    deadlines: Sequence[float],
    progress: Callable[[str], None] | None = None,
) -> tuple[int, dict[str, int], dict[str, float]]:
    """Answer each image alone under each deadline on the real clock: (answers, answers later than the
    deadline + 10 % per deadline, top-1 per deadline); deadlines keyed ``f"{ms:.3f}"``."""
    answers = 0
    late, top1 = {}, {}
    for d in deadlines:
        runner = AnytimeRunner(cohort, table, deadline_ms=d, accuracy=cal, clock=time.perf_counter)
        right = over = 0
        for x, y in zip(images, labels):
            answer = runner(x[None])
            answers += 1
            over += answer.elapsed_ms > 1.1 * d
            right += int(answer.logits.argmax(1).item() == int(y))
        key = f"{d:.3f}"
        top1[key], late[key] = 100.0 * right / max(len(labels), 1), over
        if progress:
            progress(f"deadline {d:.2f} ms: {len(labels)} answers, top-1 {top1[key]:.1f}%, {over} late")
    return answers, late, top1


def anytime_report(
    cfg: TrainConfig,
    cohort: Cohort,
    table: LatencyTable,
    *,
    eval_subset: int | None = None,
    shares: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    deadlines: int = 12,
    wall_clock: int = 0,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
) -> AnytimeReport:
    """Every curve of the module doc for a run's ``cohort`` (with exits) and latency ``table``."""
    if cohort.exits is None:
        raise XrossError("the run has no exit heads; retrain with --exits or run `xross add-exits RUN`")
    held = calibration_split(cfg)
    if held is None or len(held) == 0:
        raise XrossError("the run held out no training images to calibrate on (holdout 0); retrain with --holdout N")
    test_batches = evaluation_batches(cfg, eval_subset, batch_size)
    test_images = sum(len(y) for _, y in test_batches)
    held_batches = as_batches(held, cfg, batch_size)
    if progress:
        progress(f"scoring every exit on {len(held)} held-out and {test_images} test images")
    cal_records, test_records = collect(cohort, held_batches), collect(cohort, test_batches)
    cal, acc = prefix_accuracy(cal_records), prefix_accuracy(test_records)
    routes = [RouteCosts.of(p, table) for p in cohort.paths()]
    grid = deadline_grid(routes, deadlines)
    report = AnytimeReport(
        device=table.device,
        exits=len(cohort.exits.heads),
        routes=len(routes),
        calibration_images=len(held),
        test_images=test_images,
        full_path_top1=max(acc[r.path] for r in routes),
        deadlines=deadline_rows(routes, cal, acc, grid),
        budgets=budget_rows(routes, cal_records, test_records, shares),
        points=operating_points(routes, cal_records, test_records),
    )
    if wall_clock:
        pick = torch.linspace(0, test_images - 1, min(wall_clock, test_images)).long()  # spread over the classes
        images = torch.cat([x for x, _ in test_batches])[pick]
        labels = torch.cat([y for _, y in test_batches])[pick]
        for x in images[:4]:  # warm-up: first calls pay one-time costs the table does not hold
            cohort.forward_paths(x[None], cohort.paths())
        answers, late, top1 = wall_clock_check(cohort, table, cal, images, labels, grid, progress)
        report.wall_clock_answers, report.wall_clock_top1, report.wall_clock_late = answers, top1, late
        report.deadline_violations = sum(late.values())
    return report


def write_anytime_files(run: Path, report: AnytimeReport) -> list[Path]:
    """``anytime.json``, ``anytime.csv`` (one row per deadline and per budget) and, with matplotlib, ``anytime.png``."""
    report.save(run)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["setting", "limit", "route", "exit_or_thresholds", "top1", "cost", "full_path", "full_path_top1"])
    for d in report.deadlines:
        writer.writerow(["deadline_ms", d.deadline_ms, "-".join(map(str, d.path)), "-".join(map(str, d.prefix)),
                         d.top1, d.table_ms, "-".join(map(str, d.full_path or ())), d.full_path_top1])  # fmt: skip
    for b in report.budgets:
        writer.writerow(["mean_flops", b.budget_flops, "-".join(map(str, b.path or ())),
                         " ".join(f"{t:.4f}" for t in b.thresholds), b.top1, b.mean_flops,
                         "-".join(map(str, b.full_path or ())), b.full_path_top1])  # fmt: skip
    atomic_write_text(run / ANYTIME_CSV, buffer.getvalue())
    written = [run / ANYTIME_JSON, run / ANYTIME_CSV]
    plt = pyplot()
    if plt is None:
        return written
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ds = report.deadlines
    left.step([d.deadline_ms for d in ds], [d.top1 for d in ds], where="post", label="any-time (best route, exits)")
    full = [(d.deadline_ms, d.full_path_top1) for d in ds if d.full_path_top1 is not None]
    if full:
        left.step(*zip(*full), where="post", linestyle="--", label="best full path that fits")
    left.set_xscale("log")
    left.set_xlabel("deadline (ms, batch 1)")
    left.set_ylabel("test top-1 (%)")
    left.set_title("accuracy vs deadline")
    left.legend(fontsize=8, loc="lower right")
    for path in sorted({p.path for p in report.points}):
        pts = sorted((p.flops / 1e6, p.top1) for p in report.points if p.path == path)
        right.plot(*zip(*pts), color="0.8", linewidth=0.8)
    budgets = [b for b in report.budgets if b.mean_flops is not None]
    right.plot([b.mean_flops / 1e6 for b in budgets], [b.top1 for b in budgets], "o-", label="exits, thresholds")  # type: ignore[operator]
    fulls = [b for b in report.budgets if b.full_path_top1 is not None]
    right.plot([b.budget_flops / 1e6 for b in fulls], [b.full_path_top1 for b in fulls], "s--",
               label="best full path within budget")  # fmt: skip
    right.set_xlabel("mean MFLOPs per image")
    right.set_ylabel("test top-1 (%)")
    right.set_title("budgeted batch classification (grey: every route)")
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle(run.name)
    fig.tight_layout()
    save_png(fig, run / ANYTIME_PNG)
    return [*written, run / ANYTIME_PNG]
