"""``xross anytime`` and ``xross add-exits``: the any-time curves of a run with exit heads, and heads for a
trained cohort (registered on the ``xross`` app by :mod:`xross.cli.main`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from surgery.cli.kit import console, print_table, table
from surgery.graph.flops import FLOPS_COLUMN, human
from xross.anytime.latency import latency_table
from xross.anytime.report import AnytimeReport, anytime_report, write_anytime_files
from xross.cli.common import NoVerifyOpt, RunArg, TrustOpt, flops_input, opt, show_result
from xross.errors import XrossError
from xross.run.directory import exit_heads_config, load_run


def anytime(
    run: RunArg,
    budgets: Annotated[str, typer.Option(help="mean-FLOPs budgets, % of the costliest path")] = "25,50,75,100",
    deadlines: Annotated[int, typer.Option(help="deadlines on the any-time curve")] = 12,
    wall_clock: Annotated[int, typer.Option(help="test images answered one by one per deadline on the clock")] = 0,
    eval_subset: Annotated[Optional[int], opt("evaluate on a stratified subset (default: the run's)")] = None,
    trust_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Any-time curves of a run with exit heads: accuracy vs deadline, and vs mean FLOPs with confidence
    thresholds calibrated on held-out training images; writes anytime.json, anytime.csv and anytime.png."""
    try:
        shares = [float(b) / 100 for b in budgets.split(",")]
    except ValueError:
        raise XrossError(f"--budgets '{budgets}' should be percentages like 25,50,75,100") from None
    if not all(0 < s for s in shares):
        raise XrossError(f"--budgets '{budgets}' should be positive percentages like 25,50,75,100")
    cfg, cohort = load_run(run, trust_code=trust_code, verify=not no_verify)
    if cohort.exits is None:
        raise XrossError(f"'{run}' has no exit heads; retrain with --exits or run `xross add-exits {run} --out DIR`")
    table_ = latency_table(run, trust_code=trust_code, verify=not no_verify)
    report = anytime_report(
        cfg, cohort, table_, eval_subset=eval_subset, shares=shares, deadlines=deadlines, wall_clock=wall_clock,
        progress=lambda text: console.print(text, highlight=False),
    )  # fmt: skip
    _print_anytime(run, report)
    written = write_anytime_files(run, report)
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)


def _print_anytime(run: Path, report: AnytimeReport) -> None:
    def route(path: tuple[int, ...] | None) -> str:
        return ",".join(map(str, path)) if path else "-"

    def pct(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    rows: list[tuple[str, ...]] = [
        (f"{d.deadline_ms:.2f}", route(d.path), route(d.prefix), pct(d.top1), route(d.full_path), pct(d.full_path_top1))
        for d in report.deadlines
    ]
    columns = ["deadline ms", "route", "answers after", "top-1", "best full path", "its top-1"]
    console.print(table(f"{run}: any-time ({report.test_images} test images, {report.device})", columns, rows))
    rows = [
        (f"{100 * b.share:g}%", human(b.budget_flops), route(b.path), pct(b.top1),
         human(b.mean_flops) if b.mean_flops is not None else "-", route(b.full_path), pct(b.full_path_top1))
        for b in report.budgets
    ]  # fmt: skip
    columns = ["budget", f"mean {FLOPS_COLUMN}", "route", "top-1", "spent (test)", "best full path", "its top-1"]
    title = f"budgeted batch classification (thresholds on {report.calibration_images} held-out images)"
    print_table(table(title, columns, rows), flops_on=flops_input(run))
    if report.wall_clock_answers:
        console.print(
            f"wall clock: {report.deadline_violations} of {report.wall_clock_answers} answers later than their "
            "deadline + 10 %",
            highlight=False,
        )


def add_exits(
    run: RunArg,
    out: Annotated[Path, typer.Option(help="the new run directory (RUN is left as it is)")],
    epochs: Annotated[int, typer.Option(help="epochs of head training")] = 3,
    lr: Annotated[float, typer.Option(help="learning rate of the heads")] = 1e-3,
    exit_head: Annotated[Optional[str], opt("head factory 'module:callable' (default: pool + linear)")] = None,
    exit_weights: Annotated[Optional[str], opt("weight of each boundary's exit, e.g. 1,1")] = None,
    holdout: Annotated[Optional[int], opt("training images held out for calibration (default: a tenth)")] = None,
    force: Annotated[bool, typer.Option(help="start over in a non-empty --out")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    trust_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Train exit heads on a trained cohort, frozen (its weights and BatchNorm statistics stay): a new run with
    RUN's config, --exits on and the cohort from RUN."""
    from xross.methods.trainer import Trainer

    given = {"out": str(out), "epochs": epochs, "lr": lr, "exit_head": exit_head, "holdout": holdout}
    if exit_weights:
        given["exit_weights"] = exit_weights.split(",")
    cfg = exit_heads_config(run, **{k: v for k, v in given.items() if v is not None})
    trainer = Trainer(
        cfg, force=force, progress=progress, trust_code=trust_code, trust_typed=trust_code, verify=not no_verify,
        command="xross " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )  # fmt: skip
    result = trainer.fit()
    if trainer.dist.is_main:
        show_result(trainer.config, result, trainer.run_dir)
