"""What several ``xross`` commands share: argument types, options, and printing a run's evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, cast

import typer

from surgery.cli.kit import console, print_table, table
from surgery.graph.flops import CountedOn
from xross.run.base_config import RunConfig
from xross.run.config import TrainConfig
from xross.run.directory import run_config
from xross.run.evaluate import EvalResult
from xross.run.table import kind_of

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
    cfg = run_config(run)
    return kind_of(cfg).flops_on(cfg)


def show_result(config: RunConfig, result: EvalResult, run: Path) -> None:
    """Print a run's evaluation as its kind lays it out (xross.anytime.kinds): paths, settings or student;
    a causal-LM run's paths with their perplexity (xross.cli.lm)."""
    if config.causal_lm:
        from xross.cli.lm import lm_tables  # the trainer it builds cohorts with imports much

        tables = lm_tables(cast(TrainConfig, config), result, run)
    else:
        tables = kind_of(config).show(config, result, run)
    for t in tables:
        if t.flops_on is None:
            console.print(table(t.title, t.columns, t.rows))
        else:
            print_table(table(t.title, t.columns, t.rows), flops_on=t.flops_on)
        if t.after:
            console.print(t.after, highlight=False)
