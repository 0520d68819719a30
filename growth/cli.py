"""``growth``: grow networks from the shell without changing what they compute.

    growth sites resnet18 --op net2deeper
    growth mutate resnet18 --op net2wider --at layer2.0.conv1 --factor 1.5 --out DIR
    growth random resnet18 --steps 20 --seed 0 --log mutations.jsonl --out DIR
    growth replay resnet18 mutations.jsonl --out DIR

Every command that grows prints, per step, the parameter and FLOP change (FLOPs per
sample, on the input named under the table: ``--input``, else the one growth guesses)
and the measured max |change of the output|; ``--out`` saves the result with ``surgery.save``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from torch import nn

from growth.errors import GrowthError
from growth.graphedit import default_inputs, input_record, seeded
from growth.mutation import MutationRecord, apply_step, mutate, read_log
from growth.mutation import replay as replay_log
from growth.registry import OPS, SITE_JOIN, get_op
from growth.registry import sites as op_sites
from growth.transformer.command import check_saveable, grow_uniform, parse_uniform, save_uniform, uniform_keys
from surgery.cli.kit import console, load_model_arg, print_table, run_app, table
from surgery.core.errors import renamed_argument
from surgery.files.io import prepare_output_dir, save
from surgery.graph.flops import FLOPS_COLUMN, flops_note, human, per_sample
from surgery.graph.inputs import Example, InputSpec, vocab_size

app = typer.Typer(
    name="growth",
    help="Grow trained networks (Net2Net: wider, deeper, branches, kernels, skips) without changing their function.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[
    str, typer.Argument(help="a model reference: torchvision name, timm:NAME, hf:DIR, pkg.module:callable, DIR")
]
InputOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--input",
        help="example input, [name=][dtype:]shape: 1,3,224,224 or input_ids=int64:1,16 (repeatable; default: guessed)",
    ),
]
ClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="classifier outputs (torchvision models)")]
TrustOpt = Annotated[
    bool, typer.Option("--trust-code", help="allow saved files that name code outside the trusted packages")
]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="save the grown model to this directory")]
ForceOpt = Annotated[bool, typer.Option(help="replace a non-empty output directory")]


def _example(net: nn.Module, inputs: list[str] | None) -> Example | None:
    return Example.parse(inputs, vocab_size(net)) if inputs else None


def _step_input(net: nn.Module, inputs: list[str] | None) -> Example:
    """The input the steps run, are checked and their FLOPs counted on: ``--input``, else growth's guess for ``net``.

    Resolved once and passed to every step, so the log records it and the table can name it.
    """
    return _example(net, inputs) or default_inputs(net)


def _counted_on(record: MutationRecord) -> list[InputSpec] | None:
    """The input a step's FLOPs were counted on, as its record names it (None: the record does not say)."""
    if record.inputs:
        return list(record.inputs)
    return [InputSpec(shape=record.input_shape)] if record.input_shape else None


def _change(before: float, after: float) -> str:
    sign = "+" if after >= before else "-"
    return f"{human(before)} -> {human(after)} ({sign}{human(abs(after - before))})"


def _flops_change(before: int, after: int, on: list[InputSpec]) -> str:
    return _change(per_sample(before, on), per_sample(after, on))


def _print_steps(title: str, records: Sequence[MutationRecord], on: list[InputSpec]) -> None:
    """The table of growth steps: FLOPs per sample of the input each record names (else ``on``), named below it."""
    inputs = [_counted_on(r) or on for r in records]
    rows = [
        (
            r.step,
            r.op,
            r.site,
            _change(r.params_before, r.params_after),
            _flops_change(r.flops_before, r.flops_after, counted),
            f"{r.max_abs_change:.3g}",
        )
        for r, counted in zip(records, inputs)
    ]
    steps = table(title, ["step", "op", "site", "params", FLOPS_COLUMN, "max |Δ output|"], rows)
    for column in steps.columns[1:3]:
        column.overflow = "fold"  # names are the point: wrap them rather than cut them
    named = list({str(specs): specs for specs in inputs}.values()) or [on]
    print_table(steps, flops_on=named[0])
    for other in named[1:]:  # a log whose steps ran on different inputs
        console.print(flops_note(other), highlight=False, soft_wrap=True)
    if records:
        first, last = records[0], records[-1]
        worst = max(r.max_abs_change for r in records)
        console.print(
            f"params {_change(first.params_before, last.params_after)}, {FLOPS_COLUMN} "
            f"{_change(per_sample(first.flops_before, inputs[0]), per_sample(last.flops_after, inputs[-1]))}, "
            f"max |Δ output| {worst:.3g} (eval mode)",
            soft_wrap=True,
        )


def _start(
    model: str, out: Path | None, force: bool, num_classes: int | None, trust_code: bool, seed: int | None = None
) -> nn.Module:
    """Refuse a non-empty --out before any work, then load MODEL (a built one's weights drawn from ``seed``)."""
    if out is not None:
        prepare_output_dir(out, force)
    with seeded(seed) if seed is not None else contextlib.nullcontext():
        return load_model_arg(model, num_classes=num_classes, trust_code=trust_code)


def _finish(
    title: str,
    records: Sequence[MutationRecord],
    on: list[InputSpec],
    grown: nn.Module,
    out: Path | None,
    force: bool,
) -> None:
    """Print the steps (FLOPs counted on ``on`` where a record names no input) and save the grown model to --out."""
    _print_steps(title, records, on)
    if out is not None:
        save(grown, out, force=force)
        console.print(f"saved to {out}/")


@app.command()
def sites(
    model: ModelArg,
    op: Annotated[str, typer.Option("--op", help=f"one of {', '.join(sorted(OPS))}")],
    input: InputOpt = None,
    num_classes: ClassesOpt = None,
    trust_code: TrustOpt = False,
) -> None:
    """List where OP applies in MODEL (module paths or fx node names; src->dst pairs for add_skip)."""
    net = load_model_arg(model, num_classes=num_classes, trust_code=trust_code)
    found = op_sites(net, op, _example(net, input))
    marks = sorted({k for s in found for k in getattr(s, "args", {})})  # net2deeper: which kind each site is
    rows = [(i, s, *(str(getattr(s, "args", {}).get(k, "")) for k in marks)) for i, s in enumerate(found)]
    listing = table(f"where {op} applies in {model}", ["#", "site", *marks], rows)
    listing.columns[1].overflow = "fold"
    console.print(listing)
    console.print(f"{op} applies at {len(found)} sites")


def _op_args(op: str, given: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split the options given on the command line into the op's site and its keyword arguments."""
    spec = get_op(op)
    accepted = set(inspect.signature(spec.fn).parameters)
    missing = [p for p in spec.site_params if given.get(p) is None]
    if missing:
        raise GrowthError(
            f"{op} needs {' and '.join('--' + p for p in missing)}; list candidates with `growth sites MODEL --op {op}`"
        )
    wrong = [k for k, v in given.items() if v is not None and k not in accepted]
    if wrong:
        raise GrowthError(f"{', '.join('--' + w.replace('_', '-') for w in wrong)} does not apply to {op}")
    site = SITE_JOIN.join(str(given[p]) for p in spec.site_params)
    args = {k: v for k, v in given.items() if v is not None and k not in spec.site_params}
    if args.get("activation") == "none":
        args["activation"] = None
    return site, args


@app.command(name="mutate")
def mutate_command(
    model: ModelArg,
    op: Annotated[Optional[str], typer.Option("--op", help=f"one of {', '.join(sorted(OPS))}")] = None,
    at: Annotated[
        Optional[str],
        typer.Option(help="layer to widen / branch beside / whose kernel to grow; net2deeper: node to insert after"),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            help="instead of --op, grow a transformer uniformly, keeping its class: KEY=VALUE, repeatable, with the "
            f"keys of growth.grow_transformer ({', '.join(uniform_keys())})",
        ),
    ] = None,
    after: Annotated[Optional[str], typer.Option(hidden=True, help="the former name of --at (net2deeper)")] = None,
    src: Annotated[Optional[str], typer.Option(help="add_skip: where the skip starts")] = None,
    dst: Annotated[Optional[str], typer.Option(help="add_skip: where the skip is added")] = None,
    factor: Annotated[Optional[float], typer.Option(help="net2wider: width multiplier (> 1)")] = None,
    new_width: Annotated[Optional[int], typer.Option(help="net2wider: the new width")] = None,
    noise: Annotated[
        Optional[float], typer.Option(help="net2wider: zero-sum symmetry-breaking noise (relative std)")
    ] = None,
    seed: Annotated[
        Optional[int], typer.Option(help="seed of random choices (net2wider copies, net2branch init)")
    ] = None,
    kind: Annotated[
        Optional[str],
        typer.Option(
            help="net2deeper: conv, linear, block (a residual block copied with zero branches) or residual "
            "(a new basic residual block with a zero branch)"
        ),
    ] = None,
    kernel_size: Annotated[
        Optional[int], typer.Option(help="net2deeper / net2branch / widen_kernel kernel size")
    ] = None,
    groups: Annotated[Optional[int], typer.Option(help="net2deeper: conv groups")] = None,
    batchnorm: Annotated[
        Optional[bool], typer.Option("--batchnorm/--no-batchnorm", help="net2deeper: identity BatchNorm")
    ] = None,
    activation: Annotated[Optional[str], typer.Option(help="net2deeper: relu or none")] = None,
    hidden: Annotated[Optional[int], typer.Option(help="net2branch: channels inside the branch")] = None,
    merge: Annotated[Optional[str], typer.Option(help="net2branch: add or concat")] = None,
    width: Annotated[Optional[int], typer.Option(help="net2branch: channels appended with --merge concat")] = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    input: InputOpt = None,
    num_classes: ClassesOpt = None,
    trust_code: TrustOpt = False,
) -> None:
    """Apply one growth op to MODEL, check the output did not move, and save it."""
    at = renamed_argument("growth mutate", "--at", at, "--after", after, GrowthError)
    given = {
        k: v
        for k, v in locals().items()
        if k not in ("model", "op", "after", "out", "force", "input", "num_classes", "trust_code", "set_")
    }
    if (op is None) == (set_ is None):
        raise GrowthError("give --op (one growth step) or --set KEY=VALUE (a uniform transformer growth), not both")
    if set_ is not None:
        sizes = parse_uniform(set_, {k: v for k, v in given.items() if v is not None and k != "seed"})
        net = _start(model, out, force, num_classes, trust_code)
        check_saveable(net, out)
        grown = grow_uniform(net, sizes, seed or 0, _example(net, input), model)
        if out is not None:
            save_uniform(grown, out, force)
        return
    assert op is not None, "checked above: --op or --set"
    site, args = _op_args(op, given)
    net = _start(model, out, force, num_classes, trust_code)
    example = _step_input(net, input)
    grown, record = apply_step(net, MutationRecord(op=op, site=site, args=args, **input_record(example)), example)
    _finish(f"{op} on {model}", [record], example.specs(), grown, out, force)
    if out is not None and callable(getattr(net, "save_pretrained", None)):
        console.print(
            f"{op} grows one place, so the config no longer describes the model: saved as a graph (surgery.load); "
            "`--set KEY=VALUE` grows every layer alike and writes a from_pretrained directory",
            soft_wrap=True,
        )


@app.command(name="random")
def random_command(
    model: ModelArg,
    steps: Annotated[int, typer.Option(help="number of growth steps")] = 20,
    seed: Annotated[
        int, typer.Option(help="seed of every random choice, and of MODEL's weights when it is built (logged)")
    ] = 0,
    log: Annotated[Optional[Path], typer.Option(help="JSONL log of the steps (replay it with `growth replay`)")] = None,
    ops: Annotated[
        Optional[str], typer.Option(help=f"comma-separated ops to draw from (default: {','.join(OPS)})")
    ] = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    input: InputOpt = None,
    num_classes: ClassesOpt = None,
    trust_code: TrustOpt = False,
) -> None:
    """Grow MODEL by STEPS random feasible ops, logging each step."""
    net = _start(model, out, force, num_classes, trust_code, seed=seed)
    names = [o.strip() for o in ops.split(",") if o.strip()] if ops else None
    example = _step_input(net, input)
    grown, records = mutate(net, steps, seed, log=log, example_input=example, ops=names, base_seed=seed)
    if log is not None:
        console.print(f"logged to {log}")
    _finish(f"{steps} random growth steps of {model} (seed {seed})", records, example.specs(), grown, out, force)


@app.command(name="replay")
def replay_command(
    model: ModelArg,
    log: Annotated[Path, typer.Argument(help="JSONL log written by `growth random`")],
    out: OutOpt = None,
    force: ForceOpt = False,
    num_classes: ClassesOpt = None,
    trust_code: TrustOpt = False,
) -> None:
    """Re-apply every step of LOG to MODEL (same seeds, same network; a built MODEL gets the logged weights' seed)."""
    steps = read_log(log)
    net = _start(model, out, force, num_classes, trust_code, seed=steps[0].base_seed if steps else None)
    grown, records = replay_log(net, steps)
    on = next((c for c in map(_counted_on, steps) if c), None)  # a log of steps that name no input: growth's guess
    _finish(f"replay of {log} on {model}", records, on or default_inputs(net).specs(), grown, out, force)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
