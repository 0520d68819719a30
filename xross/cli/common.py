"""What several ``xross`` commands share: argument types, options, and the table of a cohort's evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from surgery.cli.kit import console, print_table, table
from surgery.graph.flops import FLOPS_COLUMN, CountedOn, human, per_sample
from surgery.graph.inputs import InputSpec
from xross.cohort.grid import Cohort
from xross.run.directory import is_mutualnet_run, run_config
from xross.run.evaluate import EvalResult, pareto_front

RunArg = Annotated[Path, typer.Argument(help="run directory written by `xross train` or `xross distill`")]


def opt(help: str, *names: str) -> Any:
    return typer.Option(*names, help=help, show_default=False)


TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code", help="allow names in files (nets, teachers) that run code outside the trusted packages"
    ),
]
NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="load checkpoints whose digest does not match (weights edited on purpose)")
]


def flops_input(run: Path) -> CountedOn:
    """The input a run's FLOPs are counted on: one image of the run's size (a mutualnet run: of each row's)."""
    if is_mutualnet_run(run):
        return "float32:1x3xRxR, R the row's resolution"
    side = run_config(run).image_size
    return [InputSpec(shape=[1, 3, side, side])] if side else "float32:1x3xSxS, S the side of the run's images"


def _scores(entry: Any, on: Any) -> tuple[str, ...]:
    """A path's or an exit's cells: name, top-1, top-5, params, FLOPs per sample (counted on ``on``)."""
    flops = human(per_sample(entry.flops, on))
    return entry.name, f"{entry.top1:.2f}", f"{entry.top5:.2f}", human(entry.params), flops


def print_eval(cohort: Cohort, result: EvalResult, run: Path) -> None:
    on = flops_input(run)
    front = {r.path for r in pareto_front(result.paths)}
    rows = [
        (",".join(map(str, r.path)), *_scores(r, on), "*" if r.path in front else "")
        for r in sorted(result.paths, key=lambda r: r.params)
    ]
    print_table(
        table(
            f"paths of {run} ({result.counted_on()})",
            ["path", "parts", "top-1", "top-5", "params", FLOPS_COLUMN, "pareto"],
            rows,
        ),
        flops_on=on,
    )
    ens = [(k, f"{v.top1:.2f}", f"{v.top5:.2f}") for k, v in result.ensembles.items()]
    if len(result.paths) > 1:  # one net alone: its ensembles are itself
        console.print(table("ensembles (mean softmax)", ["members", "top-1", "top-5"], ens))
    if result.exits:
        rows = [("-".join(map(str, e.prefix)), *_scores(e, on)) for e in result.exits]
        columns = ["after parts", "nets", "top-1", "top-5", "params", FLOPS_COLUMN]
        print_table(table("exits (the head after the parts run so far)", columns, rows), flops_on=on)
