"""``xross``: train a cohort with cross mutual learning, evaluate every stitched path, export one.

    xross train --nets resnet34,resnet18 --cut layer2 --mode xml --data cifar10 --epochs 30 --out runs/x1
    xross eval runs/x1
    xross best runs/x1 --max-params 12M
    xross export runs/x1 --path 0,1 --out hybrid

Distributed: ``torchrun --nproc_per_node=2 -m xross train ...``.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

import surgery
from surgery.clikit import console, run_app, table
from xross.errors import XrossError
from surgery.flops import human, parse_human
from xross.checkpoint import CheckpointDir
from xross.cohort import Cohort, parse_path
from xross.config import TrainConfig
from xross.data import BatchLoader, load_split
from xross.evaluate import EvalResult, best_path, evaluate, pareto_front
from xross.trainer import DTYPES, build_cohort

app = typer.Typer(help="Train K networks so that their pieces become interchangeable (XML), evaluate and export stitched paths.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

RunArg = Annotated[Path, typer.Argument(help="run directory written by `xross train`")]


def _opt(help: str, *names: str) -> Any:
    return typer.Option(*names, help=help, show_default=False)


@app.command()
def train(
    nets: Annotated[Optional[str], _opt("comma-separated networks (torchvision names or package.module:callable)")] = None,
    cut: Annotated[Optional[list[str]], _opt("cut point: one name for all nets or one per net 'a,b'; repeat for P > 2")] = None,
    mode: Annotated[Optional[str], _opt("independent | kd | dml | xml")] = None,
    data: Annotated[Optional[str], _opt("cifar10 | cifar100 | ImageFolder dir | .tar/.tar.xz archive of one")] = None,
    epochs: Annotated[Optional[int], _opt("epochs")] = None,
    out: Annotated[Optional[Path], _opt("run directory")] = None,
    config: Annotated[Optional[Path], _opt("start from this config.yaml (options given here override it)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    force: Annotated[bool, typer.Option(help="start over in a non-empty --out")] = False,
    subset: Annotated[Optional[int], _opt("stratified subset of the training split")] = None,
    eval_subset: Annotated[Optional[int], _opt("stratified subset of the evaluation split")] = None,
    image_size: Annotated[Optional[int], _opt("resize images to this side")] = None,
    batch_size: Annotated[Optional[int], _opt("global batch size")] = None,
    optimizer: Annotated[Optional[str], _opt("sgd | adam | adamw (default adam, as the research)")] = None,
    lr: Annotated[Optional[float], _opt("learning rate (default 1e-4)")] = None,
    momentum: Annotated[Optional[float], _opt("SGD momentum")] = None,
    nesterov: Annotated[Optional[bool], _opt("Nesterov momentum (sgd)", "--nesterov/--no-nesterov")] = None,
    weight_decay: Annotated[Optional[float], _opt("weight decay")] = None,
    lr_schedule: Annotated[Optional[str], _opt("constant | cosine | step")] = None,
    warmup_epochs: Annotated[Optional[float], _opt("linear warm-up epochs")] = None,
    label_smoothing: Annotated[Optional[float], _opt("label smoothing of every CE term")] = None,
    grad_clip: Annotated[Optional[float], _opt("clip the gradient norm")] = None,
    schedule: Annotated[Optional[str], _opt("alternate (each student's loss trains only it) | joint (one backward)")] = None,
    cross: Annotated[Optional[str], _opt("xml cross paths: all | single")] = None,
    adapter_update: Annotated[Optional[str], _opt("which student's loss trains an adapter: student | up | down")] = None,
    adapter_batchnorm: Annotated[Optional[bool], _opt("BatchNorm in the adapters", "--adapter-batchnorm/--no-adapter-batchnorm")] = None,
    stem: Annotated[Optional[str], _opt("imagenet | cifar (3x3 stride-1 conv1, no maxpool)")] = None,
    teacher: Annotated[Optional[list[str]], _opt("kd teacher: saved model directory (repeat for an ensemble)")] = None,
    temperature: Annotated[Optional[float], _opt("kd temperature")] = None,
    kd_alpha: Annotated[Optional[float], _opt("kd weight of the hard-label CE")] = None,
    seed: Annotated[Optional[int], _opt("random seed")] = None,
    device: Annotated[Optional[str], _opt("auto | cpu | cuda | cuda:N")] = None,
    amp: Annotated[Optional[str], _opt("off | bf16 | fp16 (CUDA)")] = None,
    dtype: Annotated[Optional[str], _opt("float32 | float64 (exact comparisons, debugging)")] = None,
    channels_last: Annotated[Optional[bool], _opt("channels-last memory format", "--channels-last/--no-channels-last")] = None,
    compile: Annotated[Optional[bool], _opt("torch.compile the parts (CUDA)", "--compile/--no-compile")] = None,
    threads: Annotated[Optional[int], _opt("CPU threads")] = None,
    eval_every: Annotated[Optional[int], _opt("evaluate the full nets every N epochs (0: only at the end)")] = None,
    log_every: Annotated[Optional[int], _opt("log every N steps")] = None,
    cache_dir: Annotated[Optional[str], _opt("decoded-data cache directory")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train a cohort (Independent, KD, DML or XML); checkpoints every epoch and on Ctrl-C."""
    from xross.trainer import Trainer

    given = {k: v for k, v in locals().items() if v is not None and k not in ("config", "resume", "force", "progress", "Trainer")}
    if "nets" in given:
        given["nets"] = [n.strip() for n in given["nets"].split(",") if n.strip()]
    if "cut" in given:
        given["cuts"] = given.pop("cut")
    for key in ("out", "cache_dir"):
        if key in given:
            given[key] = str(given[key])
    if resume:
        cfg = _resume_config(given)
    else:
        base = TrainConfig.load(config) if config else TrainConfig()
        cfg = TrainConfig.from_dict({**dataclasses.asdict(base), **given})
    command = "xross " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    trainer = Trainer(cfg, resume=resume, force=force, progress=progress, command=command)
    result = trainer.fit()
    if trainer.dist.is_main:
        _print_eval(trainer.cohort, result, trainer.run_dir)


RESUME_MAY_CHANGE = ("out", "epochs", "device", "threads", "log_every", "eval_every", "cache_dir")


def _resume_config(given: dict[str, Any]) -> TrainConfig:
    """The run's own config; only options that do not change the computation may be given with --resume."""
    if "out" not in given:
        raise XrossError("--resume needs --out RUN_DIR (the run to continue)")
    saved = Path(given["out"]) / "config.yaml"
    if not saved.is_file():
        raise XrossError(f"cannot resume: '{saved}' does not exist; start the run without --resume")
    changed = [k for k in given if k not in RESUME_MAY_CHANGE]
    if changed:
        raise XrossError(f"--resume continues the run as it was configured; drop --{changed[0].replace('_', '-')} (only {', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may be given)")
    cfg = TrainConfig.load(saved)
    for k, v in given.items():
        setattr(cfg, k, v)
    return cfg


def _rebuild(run: Path) -> tuple[TrainConfig, Cohort]:
    cfg = TrainConfig.load(run / "config.yaml")
    cohort = build_cohort(cfg, torch.device("cpu"))
    path, state = CheckpointDir(run).load_latest()
    cohort.load_state_dict(state["cohort"])
    return cfg, cohort.to(DTYPES[cfg.dtype]).eval()


def _print_eval(cohort: Cohort, result: EvalResult, run: Path) -> None:
    front = {r.path for r in pareto_front(result.paths)}
    rows = [
        (",".join(map(str, r.path)), r.name, f"{r.top1:.2f}", f"{r.top5:.2f}", human(r.params), human(r.flops), "*" if r.path in front else "")
        for r in sorted(result.paths, key=lambda r: r.params)
    ]
    console.print(table(f"paths of {run} ({result.samples} images)", ["path", "parts", "top-1", "top-5", "params", "FLOPs", "pareto"], rows))
    ens = [(k, f"{v['top1']:.2f}", f"{v['top5']:.2f}") for k, v in result.ensembles.items()]
    console.print(table("ensembles (mean softmax)", ["members", "top-1", "top-5"], ens))


@app.command("eval")
def eval_run(
    run: RunArg,
    eval_subset: Annotated[Optional[int], _opt("evaluate on a stratified subset (default: the run's)")] = None,
    batch_size: Annotated[int, typer.Option(help="evaluation batch size")] = 256,
) -> None:
    """Top-1/top-5 of every path, ensembles and the Pareto front; writes RUN/eval.json."""
    cfg, cohort = _rebuild(run)
    test = load_split(cfg.data, "test", subset=eval_subset or cfg.eval_subset, image_size=cfg.image_size, cache_dir=cfg.cache_dir, seed=cfg.seed)
    dtype = DTYPES[cfg.dtype]
    batches = ((x.to(dtype), y) for x, y in BatchLoader(test, batch_size, train=False).epoch(0))
    result = evaluate(cohort, batches, cfg.image_size)
    result.save(run / "eval.json")
    _print_eval(cohort, result, run)


def _results(run: Path) -> EvalResult:
    path = run / "eval.json"
    if not path.is_file():
        raise XrossError(f"'{run}' has no eval.json; run `xross eval {run}` first")
    return EvalResult.load(path)


@app.command()
def best(
    run: RunArg,
    max_params: Annotated[Optional[str], _opt("parameter budget, e.g. 12M")] = None,
    max_flops: Annotated[Optional[str], _opt("FLOP budget per image, e.g. 1.5G")] = None,
) -> None:
    """The most accurate stitched path within a parameter/FLOP budget."""
    try:
        mp = parse_human(max_params) if max_params else None
        mf = parse_human(max_flops) if max_flops else None
    except ValueError:
        raise XrossError("budgets are numbers with an optional k/M/G/T suffix, e.g. 12M") from None
    r = best_path(_results(run).paths, max_params=mp, max_flops=mf)
    console.print(f"best path {','.join(map(str, r.path))} ({r.name}): top-1 {r.top1:.2f}%, {human(r.params)} params, {human(r.flops)} FLOPs")


@app.command()
def export(
    run: RunArg,
    path: Annotated[str, typer.Option(help="net index per part, e.g. 0,1")],
    out: Annotated[Path, typer.Option(help="output directory (surgery's safe format)")],
    force: Annotated[bool, typer.Option(help="replace a non-empty output directory")] = False,
) -> None:
    """Save one stitched path as a standalone model (load it with surgery.load)."""
    surgery.io.prepare_output_dir(out, force)
    _, cohort = _rebuild(run)
    chosen = parse_path(path, cohort.num_nets, cohort.num_parts)
    surgery.save(cohort.export_path(chosen), out, force=force)
    console.print(f"saved path {path} ({cohort.path_name(chosen)}) to {out}/")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
