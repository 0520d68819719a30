"""``xross``: train a cohort with cross mutual learning, evaluate every stitched path, export one, distil them.

    xross train --nets resnet34,resnet18 --cut layer2 --mode xml --data cifar10 --epochs 30 --out runs/x1
    xross eval runs/x1
    xross best runs/x1 --max-params 12M
    xross export runs/x1 --path 0,1 --out hybrid
    xross distill --student runs/x1@1-1 --teacher runs/x1 --teacher-paths all --out runs/d1

Distributed: ``torchrun --nproc_per_node=2 -m xross train ...``.
"""

from __future__ import annotations

import inspect
import shlex
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

import surgery
from surgery.cli.kit import (
    console,
    model_values,
    option_name,
    options_from_model,
    print_table,
    run_app,
    table,
    with_signature,
)
from surgery.graph.flops import FLOPS_COLUMN, CountedOn, human, input_text, parse_human
from surgery.graph.inputs import InputSpec
from xross.anytime.latency import (
    LATENCY_FILE,
    SPREAD_NOTE,
    batch1_ms,
    latency_table,
    profile_run,
    spread_text,
    warn_if_unreliable,
)
from xross.anytime.query import COLUMNS, parse_ms, query_rows, row_values, write_query_files
from xross.anytime.report import AnytimeReport, best_point, deadline_choice
from xross.cli.anytime import add_exits, anytime
from xross.cli.common import NoVerifyOpt, RunArg, TrustOpt, flops_input, opt, show_result
from xross.cli.diagnose import diagnose_command, similarity_command
from xross.cli.lm import eval_lm_run
from xross.errors import XrossError
from xross.run.config import DistillConfig, RunConfig, TrainConfig, config_from_options
from xross.run.directory import (
    as_batches,
    evaluation_split,
    run_config,
)
from xross.run.evaluate import EvalResult, best_path
from xross.run.table import ExportChoice, command_methods, help_suffix, kind_of, method_of

app = typer.Typer(
    name="xross",
    help="Train K networks so that their pieces become interchangeable (XML), evaluate and export stitched paths, "
    "distil them into one network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _run(config_class: type[RunConfig], options: dict[str, Any], typed: str) -> tuple[Any, EvalResult]:
    """Run a training or distillation from a run command's options (over --config, or the run's own with
    --resume) with the engine of its method (the table, xross.run.table); ``typed`` names the config field
    whose model references count as typed by the user (trusted) when given on this command line."""
    given = model_values(config_class, options)
    cfg = config_from_options(config_class, given, resume=options["resume"], base=options["config"])
    trust = bool(options["trust_code"])
    engine = method_of(cfg).engine(
        cfg,
        resume=options["resume"],
        force=options["force"],
        progress=options["progress"],
        command="xross " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        trust_code=trust,
        trust_typed=trust or (typed in given and not options["resume"]),
        verify=not options["no_verify"],
    )
    return engine, engine.fit()


def train(**options: Any) -> None:
    """Train a cohort (Independent, KD, DML or XML), or one net at every width (MutualNet); checkpoints every
    epoch and on Ctrl-C.

    Every option but the first six is a field of the run's config (xross.run.config.TrainConfig);
    options given here override --config. Nets named on this command line are trusted;
    nets and teachers read from files need --trust-code if they name outside code.
    """
    trainer, result = _run(TrainConfig, options, "nets")
    if trainer.dist.is_main:
        show_result(trainer.config, result, trainer.run_dir)


def distill(**options: Any) -> None:
    """Distil teachers (runs and their stitched paths, saved models) into one student (MEAL V2).

    Every option but the first six is a field of the run's config (xross.run.config.DistillConfig);
    options given here override --config. A student model reference typed here is trusted;
    teachers and students read from files need --trust-code if they name outside code.
    """
    distiller, result = _run(DistillConfig, options, "student")
    if distiller.dist.is_main:
        show_result(distiller.config, result, distiller.run_dir)


_RUN_PARAMS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    for name, default, annotation in (
        (
            "config",
            None,
            Annotated[Optional[Path], opt("start from this config.yaml (options given here override it)")],
        ),
        ("resume", False, Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")]),
        ("force", False, Annotated[bool, typer.Option(help="start over in a non-empty --out")]),
        ("progress", True, Annotated[bool, typer.Option(help="show a progress bar")]),
        ("trust_code", False, TrustOpt),
        ("no_verify", False, NoVerifyOpt),
    )
]
_FIXED = ("format_version", "kind")


def _config_options(config_class: type[RunConfig]) -> list[inspect.Parameter]:
    """The options of a config's fields, each help saying which methods use it (from the fields' declarations,
    xross.run.table.uses); ``--mode`` lists the table's methods."""
    params = options_from_model(config_class, exclude=_FIXED)
    fields = {option_name(name, field): (name, field) for name, field in config_class.model_fields.items()}
    for param in params:
        name, field = fields[param.name]
        option = typing.get_args(param.annotation)[1]
        option.help = option.help.replace(str(field.description), f"{field.description}{help_suffix(name, field)}", 1)
        if name == "mode":  # the table's methods, read when the command line is (a method registered later too)
            option.parser, option.metavar = _method_name, f"[{'|'.join(command_methods('train'))}]"
    return params


def _method_name(value: str) -> str:
    """``--mode``'s value if the table has such a method of ``xross train``, else click's one-line refusal."""
    names = command_methods("train")
    if value not in names:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, names))}.")
    return value


app.command()(with_signature(train, [*_RUN_PARAMS, *_config_options(TrainConfig)]))
app.command()(with_signature(distill, [*_RUN_PARAMS, *_config_options(DistillConfig)]))


@app.command("eval")
def eval_run(
    run: RunArg,
    eval_subset: Annotated[Optional[int], opt("evaluate on a stratified subset (default: the run's)")] = None,
    batch_size: Annotated[int, typer.Option(help="evaluation batch size")] = 256,
    trust_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Top-1/top-5 of every path (of a distillation: student, teachers; of a mutualnet run: every width and
    resolution), ensembles, Pareto front; writes eval.json."""
    cfg = run_config(run)
    if cfg.causal_lm:  # loss and perplexity of every path on the run's held-out windows
        if eval_subset is not None:
            raise XrossError("--eval-subset keeps a subset of images; a causal_lm run evaluates its held-out windows")
        result = eval_lm_run(
            run, typing.cast(TrainConfig, cfg), batch_size, trust_code=trust_code, verify=not no_verify
        )
        result.save(run / "eval.json")
        show_result(cfg, result, run)
        return
    kind, verify, split = kind_of(cfg), not no_verify, {}
    _, model = kind.load(run, trust_code=trust_code, verify=verify)  # models first, then data

    def batches() -> list[tuple[Any, Any]]:
        test = evaluation_split(cfg, eval_subset)
        split["split"] = test.split
        return as_batches(test, cfg, batch_size)

    result = kind.evaluate(
        run, cfg, model, batches, trust_code=trust_code, verify=verify, progress=lambda text: console.print(text)
    ).model_copy(update=split)
    result.save(run / "eval.json")
    show_result(cfg, result, run)


def _flops_text(flops: float, on: CountedOn) -> str:
    """``'1.82G FLOPs per sample on float32:1x3x224x224'``: a figure of a sentence, with its input (batch 1)."""
    return f"{human(flops)} {FLOPS_COLUMN} on {input_text(on)}"


def _results(run: Path) -> EvalResult:
    path = run / "eval.json"
    if not path.is_file():
        raise XrossError(f"'{run}' has no eval.json; run `xross eval {run}` first")
    return EvalResult.load(path)


@app.command()
def best(
    run: RunArg,
    max_params: Annotated[Optional[str], opt("parameter budget, e.g. 12M")] = None,
    max_flops: Annotated[Optional[str], opt("FLOP budget per image, e.g. 1.5G")] = None,
    max_latency: Annotated[
        Optional[str], opt("batch-1 latency budget from `xross profile`, e.g. 5ms (with exits: a deadline)")
    ] = None,
    mean_flops: Annotated[
        Optional[str], opt("mean FLOPs per image with confident early exits (after `xross anytime`), e.g. 20M")
    ] = None,
) -> None:
    """The most accurate path (or width-resolution setting) within a parameter/FLOP/latency budget; with exit
    heads, the route and exit to use under a deadline, or the route and thresholds for a mean FLOP budget."""
    try:
        mp = parse_human(max_params) if max_params else None
        mf = parse_human(max_flops) if max_flops else None
        mean = parse_human(mean_flops) if mean_flops else None
    except ValueError:
        raise XrossError("budgets are numbers with an optional k/M/G/T suffix, e.g. 12M") from None
    ml = parse_ms(max_latency) if max_latency else None
    if mean is not None:
        if mp is not None or mf is not None or ml is not None:
            raise XrossError(
                "--mean-flops is a budget of its own; give it without --max-params/--max-flops/--max-latency"
            )
        point = best_point(AnytimeReport.load(run).points, mean)
        thresholds = ", ".join(f"{t:.3f}" if t <= 1 else "never" for t in point.thresholds)
        console.print(
            f"route {','.join(map(str, point.path))} with exit thresholds {thresholds}: top-1 {point.top1:.2f}% at "
            f"a mean of {_flops_text(point.flops, flops_input(run))}, on the test split (calibration: "
            f"{point.calibration_top1:.2f}% at {human(point.calibration_flops)})",
            highlight=False,
            soft_wrap=True,
        )
        return
    results = _results(run)
    if ml is not None and results.exits:
        if mp is not None:
            raise XrossError("with exits --max-latency is a deadline; combine it with --max-flops, not --max-params")
        chosen = deadline_choice(results, latency_table(run), ml, mf)
        stop = "its end" if len(chosen.prefix) == len(chosen.path) else f"the exit after part {chosen.stage}"
        console.print(
            f"route {','.join(map(str, chosen.path))}, answering from {stop}: top-1 {chosen.accuracy:.2f}%, "
            f"{chosen.ms:.2f} ms, {_flops_text(chosen.flops, flops_input(run))}",
            highlight=False,
            soft_wrap=True,
        )
        return
    latency = batch1_ms(run) if ml is not None else None
    if ml is not None and latency is None:
        raise XrossError(f"a latency budget needs '{run}/{LATENCY_FILE}'; measure it with `xross profile {run}`")
    r = best_path(results.paths, max_params=mp, max_flops=mf, max_latency=ml, latency=latency)
    what = {"student": "the student", "setting": "best setting"}.get(r.role, f"best path {','.join(map(str, r.path))}")
    ms = f", {latency[r.name]:.2f} ms" if latency else ""
    on = [InputSpec(shape=[1, 3, r.resolution, r.resolution])] if r.resolution else flops_input(run)
    console.print(
        f"{what} ({r.name}): top-1 {r.top1:.2f}%, {human(r.params)} params, {_flops_text(r.flops, on)}{ms}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def export(
    run: RunArg,
    out: Annotated[Path, typer.Option(help="output directory (surgery's safe format)")],
    path: Annotated[Optional[str], opt("net index per part, e.g. 0,1 (a training run's path)")] = None,
    width: Annotated[Optional[float], opt("a mutualnet run's width, e.g. 0.5")] = None,
    resolution: Annotated[Optional[int], opt("a mutualnet run's input resolution, e.g. 24")] = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty output directory")] = False,
    trust_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Save one stitched path (of a distillation run: its student; of a mutualnet run: one width and
    resolution, cut at the run's cut points) as standalone pieces (surgery.load)."""
    kind = kind_of(run_config(run))
    module, what = kind.export(
        run,
        ExportChoice(path=path, width=width, resolution=resolution),
        trust_code=trust_code,
        verify=not no_verify,
        prepare=lambda: surgery.files.io.prepare_output_dir(out, force),
    )
    surgery.save(module, out, force=force)
    console.print(f"saved {what} to {out}/")


@app.command("table")
def query_table(run: RunArg) -> None:
    """The query table (Pareto front of accuracy over FLOPs, with latency after `xross profile`); writes
    query.csv and query.png in the run directory."""
    result = _results(run)
    latency = batch1_ms(run)
    rows = [row_values(r, latency) for r in query_rows(result.paths)]
    print_table(table(f"{run}: query table ({result.counted_on()})", COLUMNS, rows), flops_on=flops_input(run))
    written = write_query_files(run, result.paths, latency)
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)


@app.command()
def profile(
    run: RunArg,
    batch: Annotated[int, typer.Option(help="the larger batch size timed besides batch 1")] = 32,
    repeats: Annotated[int, typer.Option(help="timed calls per entry (the median and the spread are kept)")] = 10,
    trust_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Time every network of a run on this machine (each path, student or width-resolution setting);
    writes latency.json, which `xross best --max-latency` and `xross table` read."""
    latency = profile_run(run, batch, repeats, trust_code=trust_code, verify=not no_verify)
    latency.save(run)
    device = latency.device
    rows = [
        (n, f"{e.ms_batch1:.2f}", f"{e.ms_batch:.1f}", spread_text(e), human(e.flops), human(e.params))
        for n, e in latency.entries.items()
    ]
    columns = ["network", "ms (batch 1)", f"ms (batch {batch})", "spread", FLOPS_COLUMN, "params"]
    print_table(table(f"{run}: latency on {device}", columns, rows), flops_on=flops_input(run))
    console.print(SPREAD_NOTE.format(repeats=repeats), highlight=False)
    warn_if_unreliable(latency, run)


@app.command()
def cache(
    action: Annotated[str, typer.Argument(help="info (list the decoded splits) | clear (remove them)")],
    cache_dir: Annotated[
        Optional[Path], typer.Option(help="cache directory (default: $XROSS_CACHE or ~/.cache/xross)")
    ] = None,
) -> None:
    """See or empty the decoded-data cache (capped at $XROSS_CACHE_MAX_GB GiB, default 20)."""
    import datetime

    from surgery.cli.kit import console, table
    from surgery.core.errors import did_you_mean
    from xross.data.cache import cache_info, clear_cache, default_cache_dir, human_bytes, max_cache_bytes
    from xross.errors import XrossError

    if action not in ("info", "clear"):
        choices = did_you_mean(action, ("info", "clear"))
        raise XrossError(f"unknown action '{action}'; use `xross cache info` or `xross cache clear` ({choices})")
    root = cache_dir if cache_dir is not None else default_cache_dir()
    entries = cache_info(root)
    if action == "clear":
        freed = clear_cache(root)
        message = f"removed {len(entries)} cached splits from {root}: {human_bytes(freed)} freed"
        console.print(message, highlight=False, soft_wrap=True)
        return
    total, cap = sum(entry.bytes for entry in entries), max_cache_bytes()
    message = f"{root}: {len(entries)} cached splits, {human_bytes(total)} of at most {human_bytes(cap)}"
    console.print(message, highlight=False, soft_wrap=True)
    if entries:
        when = [datetime.datetime.fromtimestamp(entry.last_used).strftime("%Y-%m-%d %H:%M:%S") for entry in entries]
        rows = [(entry.path.name, human_bytes(entry.bytes), used) for entry, used in zip(entries, when)]
        console.print(table("least recently used first (removed first)", ["entry", "size", "last used"], rows))


app.command()(anytime)
app.command("add-exits")(add_exits)
app.command("diagnose")(diagnose_command)
app.command("similarity")(similarity_command)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
