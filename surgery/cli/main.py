"""``surgery``: list cut points, cut, stitch, export and draw networks from the shell.

    surgery nodes resnet50 --depth 2
    surgery cut resnet50 --at layer2 --out resnet50-cut
    surgery cut hf:./bert-small --at bert.encoder.layer.1 --input "input_ids=int64:1,16 attention_mask=int64:1,16"
    surgery stitch resnet18-cut:0 resnet50-cut:1 --out hybrid
    surgery export resnet50-cut --format onnx --out resnet50-onnx
    surgery show hybrid --out hybrid.svg

MODEL arguments follow one grammar (:mod:`surgery.files.refs`): a torchvision name, ``timm:NAME``,
``hf:DIR``, ``pkg.module:callable``, a saved directory, ``DIR:INDEX`` or ``RUN@0-1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from surgery.cli.kit import console, example_for, load_model_arg, print_table, run_app, table
from surgery.core.errors import SurgeryError, running_on
from surgery.core.specs import known_specs
from surgery.core.util import max_difference
from surgery.exporters import describe_values, read_manifest
from surgery.exporters import export as export_pieces
from surgery.files.io import load, prepare_output_dir, save
from surgery.graph.capture import TRACERS
from surgery.graph.flops import FLOPS_COLUMN, human, per_sample
from surgery.graph.inputs import Example
from surgery.pieces.adapters import INITS
from surgery.pieces.adapters import stitch as stitch_pieces
from surgery.pieces.cut import Pieces, piece_info
from surgery.pieces.cut import cut as cut_model
from surgery.pieces.cutpoints import cut_points
from surgery.pieces.render import render
from surgery.pieces.split import parse_rate, suggest_splits

app = typer.Typer(
    name="surgery",
    help="Cut trained networks into exact pieces, stitch pieces of different networks, draw them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="a model: torchvision name, timm:NAME, hf:DIR, pkg.module:callable, saved DIR, DIR:INDEX, RUN@0-1"
    ),
]
InputOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--input",
        help=(
            "example input [name=][dtype:]shape, e.g. 1,3,224,224 or input_ids=int64:1,16 "
            "(repeatable; default: guessed)"
        ),
    ),
]
TracerOpt = Annotated[
    str,
    typer.Option("--tracer", help=f"graph front-end: {' | '.join(TRACERS)} (auto: fx, fx with leaves, torch.export)"),
]
ClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="classifier outputs (torchvision models)")]
WeightsOpt = Annotated[
    Optional[Path],
    typer.Option("--weights", help="local state_dict file (.safetensors, or torch file read with weights_only)"),
]
LeafOpt = Annotated[
    Optional[list[str]], typer.Option("--leaf", help="module path to keep as one call when tracing (repeatable)")
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-code", help="allow saved files that name code outside the trusted packages")
]


FLOPS_SO_FAR = f"{FLOPS_COLUMN} so far"


def _right(col: str) -> str:
    numeric = ("params", FLOPS_COLUMN, "#", "crossing", "crossing bytes", "params so far", FLOPS_SO_FAR, "sent")
    return "right" if col in numeric or col.endswith((" ms", "|diff|")) else "left"


@app.command()
def nodes(
    model: ModelArg,
    input: InputOpt = None,
    depth: Annotated[int, typer.Option(help="deepest module path level to list (layer2 is 1, layer2.1 is 2)")] = 2,
    all_nodes: Annotated[bool, typer.Option("--nodes/--no-nodes", help="also list fx node names")] = False,
    num_classes: ClassesOpt = None,
    weights: WeightsOpt = None,
    leaf: LeafOpt = None,
    tracer: TracerOpt = "auto",
    trust_code: TrustOpt = False,
) -> None:
    """Table of the places MODEL can be cut, with shapes, bytes crossing, parameters and FLOPs per sample so far."""
    net = load_model_arg(model, num_classes=num_classes, weights=weights, trust_code=trust_code)
    example = example_for(net, input)
    points = cut_points(net, example, depth=depth, include_nodes=all_nodes, leaf_modules=leaf or [], tracer=tracer)
    rows = [
        (
            p.name,
            p.kind,
            p.shape,
            p.crossing,
            human(p.bytes or 0, "B"),
            human(p.params),
            human(per_sample(p.flops or 0, example)),
        )
        for p in points
    ]
    columns = ["name", "kind", "output", "crossing", "crossing bytes", "params so far", FLOPS_SO_FAR]
    print_table(table(f"cut points of {model}", columns, rows, _right), flops_on=example)


def _pieces_table(title: str, pieces: Pieces, example: Example) -> None:
    rows = [
        (s.index, s.inputs, s.outputs, human(s.params), human(per_sample(s.flops, example)))
        for s in pieces.summary(example)
    ]
    print_table(table(title, ["#", "input", "output", "params", FLOPS_COLUMN], rows, _right), flops_on=example)


SUGGEST_HELP = "rank where to split MODEL between a device and a server by latency (Neurosurgeon); cuts nothing"


def _suggest_split(
    model: str,
    input: list[str] | None,
    num_classes: int | None,
    weights: Path | None,
    leaf: list[str] | None,
    trust_code: bool,
    rates: tuple[str | None, str | None, str | None],
) -> None:
    """``surgery cut MODEL --suggest-split``: the 10 fastest device/server splits; cuts and saves nothing."""
    if None in rates:
        raise SurgeryError("--suggest-split needs --device-flops, --server-flops and --bandwidth (e.g. 10G 1T 12.5M)")
    options = (("--device-flops", "FLOP/s"), ("--server-flops", "FLOP/s"), ("--bandwidth", "bytes/s"))
    device, server, link = (parse_rate(str(text), what, unit) for text, (what, unit) in zip(rates, options))
    net = load_model_arg(model, num_classes=num_classes, weights=weights, trust_code=trust_code).eval()
    choices = suggest_splits(net, example_for(net, input), device, server, link, leaf_modules=leaf or [])
    rows = [(c.name, human(c.bytes_sent, "B"), *(f"{t * 1e3:.2f}" for t in c.times)) for c in choices[:10]]
    speeds = f"device {human(device, 'FLOP/s')}, server {human(server, 'FLOP/s')}, link {human(link, 'B/s')}"
    columns = ["cut", "sent", "device ms", "transfer ms", "server ms", "total ms"]
    console.print(table(f"where to split {model} ({speeds})", columns, rows, _right))


@app.command()
def cut(
    model: ModelArg,
    at: Annotated[Optional[list[str]], typer.Option(help="cut after this module path or fx node (repeatable)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output directory (default ./MODEL-cut)")] = None,
    input: InputOpt = None,
    num_classes: ClassesOpt = None,
    weights: WeightsOpt = None,
    leaf: LeafOpt = None,
    render_graph: Annotated[
        bool, typer.Option("--render", help="also draw the pieces to OUT/pieces.svg (or .dot)")
    ] = False,
    force: Annotated[bool, typer.Option(help="replace a non-empty output directory")] = False,
    tracer: TracerOpt = "auto",
    trust_code: TrustOpt = False,
    suggest_split: Annotated[bool, typer.Option(help=SUGGEST_HELP)] = False,
    device_flops: Annotated[Optional[str], typer.Option(help="with --suggest-split: device FLOP/s, e.g. 10G")] = None,
    server_flops: Annotated[Optional[str], typer.Option(help="with --suggest-split: server FLOP/s, e.g. 1T")] = None,
    bandwidth: Annotated[Optional[str], typer.Option(help="with --suggest-split: link bytes/s, e.g. 12.5M")] = None,
) -> None:
    """Cut MODEL after each --at point, check the pieces reproduce it exactly, save them (or --suggest-split)."""
    if suggest_split:
        rates = (device_flops, server_flops, bandwidth)
        return _suggest_split(model, input, num_classes, weights, leaf, trust_code, rates)
    if not at:
        raise SurgeryError("give at least one --at point to cut after (list them with: surgery nodes MODEL)")
    target = out or Path(f"{Path(model.rstrip('/')).name.replace(':', '_')}-cut")
    prepare_output_dir(target, force)  # refuse early, before any work
    net = load_model_arg(model, num_classes=num_classes, weights=weights, trust_code=trust_code).eval()
    example = example_for(net, input)
    pieces = cut_model(net, at, example, leaf_modules=leaf or [], tracer=tracer)
    with torch.no_grad(), running_on(tuple(example.tensors())):
        diff = max_difference(example(pieces), example(net))
    _pieces_table(f"{model} cut at {', '.join(at)}", pieces, example)
    colour = "green" if diff == 0 else "red"
    origin = pieces.infos()[0].origin
    tracer_used = origin.tracer if origin else "fx"
    console.print(
        f"max |pieces(x) - model(x)| = [{colour}]{diff:g}[/] on a random {example.describe()} input "
        f"(eval mode, {tracer_used})"
    )
    save(pieces, target, force=force)
    console.print(f"saved {len(pieces)} pieces to {target}/")
    if render_graph:
        try:
            console.print(f"drew {render(pieces, target / 'pieces.svg')}")
        except SurgeryError as e:
            console.print(f"[yellow]{e}[/]")


@app.command()
def stitch(
    up: Annotated[str, typer.Argument(help="the upstream piece, DIR:INDEX (or any model reference)")],
    down: Annotated[str, typer.Argument(help="the downstream piece, DIR:INDEX")],
    out: Annotated[Path, typer.Option(help="output directory")],
    input: InputOpt = None,
    adapter: Annotated[
        bool, typer.Option("--adapter/--no-adapter", help="insert an adapter where the shapes differ")
    ] = True,
    batchnorm: Annotated[bool, typer.Option(help="BatchNorm in the adapter")] = False,
    init: Annotated[str, typer.Option(help=f"adapter initialisation: {' | '.join(INITS)}")] = "auto",
    reference: Annotated[
        Optional[str], typer.Option(help="with --init lstsq: the pieces before DOWN in its own network, e.g. DIR:0")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty output directory")] = False,
    trust_code: TrustOpt = False,
) -> None:
    """Join UP's piece to DOWN's piece (with an adapter where needed) and save the result."""
    prepare_output_dir(out, force)
    up_piece, down_piece = load_model_arg(up, trust_code=trust_code), load_model_arg(down, trust_code=trust_code)
    if input:
        example = example_for(up_piece, input)
    else:
        specs = known_specs(piece_info(up_piece).in_specs)
        shape = specs[0].shape if specs and len(specs) == 1 and specs[0].is_tensor else None
        if shape is None:
            raise SurgeryError("the up piece has no single recorded input shape; pass --input (e.g. 1,3,224,224)")
        example = Example((torch.randn(2, *shape),), {})
    ref = load_model_arg(reference, trust_code=trust_code) if reference else None
    hybrid = stitch_pieces(
        up_piece, down_piece, example, allow_adapter=adapter, batchnorm=batchnorm, init=init, reference=ref
    ).eval()
    _pieces_table(f"{up} + {down}", hybrid, example)
    save(hybrid, out, force=force)
    console.print(f"saved to {out}/")


@app.command()
def show(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="graph file: .svg, .png, .pdf or .dot")] = Path("graph.svg"),
    num_classes: ClassesOpt = None,
    trust_code: TrustOpt = False,
) -> None:
    """Draw MODEL (or a saved model / pieces directory) as a graph."""
    obj = load_model_arg(model, num_classes=num_classes, trust_code=trust_code)
    console.print(f"wrote {render(obj, out)}")


@app.command("export")
def export_command(
    pieces_dir: Annotated[Path, typer.Argument(help="a directory saved by surgery cut or stitch")],
    out: Annotated[Path, typer.Option(help="output directory: piece<k>.onnx or .pt2 files + pieces.json")],
    format: Annotated[str, typer.Option(help="onnx (needs onnx and onnxruntime) or pt2 (torch.export)")] = "onnx",
    input: Annotated[
        Optional[list[str]], typer.Option(help="example input, e.g. 1,3,224,224 (default: as cut)")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty output directory")] = False,
    verbose: Annotated[bool, typer.Option(help="show the exporters' messages")] = False,
    trust_code: TrustOpt = False,
) -> None:
    """Export saved pieces to files that run without PyTorch (ONNX) or without this library (.pt2), checked."""
    prepare_output_dir(out, force)  # refuse early, before any work
    pieces = load(pieces_dir, trust_code=trust_code)
    x = example_for(pieces, input) if input else None
    manifest = read_manifest(export_pieces(pieces, out, format, x, force=force, verbose=verbose))
    rows = [
        (p["index"], p["file"], describe_values(p["inputs"]), describe_values(p["outputs"]), f"{p['max_abs_diff']:.2g}")
        for p in manifest["pieces"]
    ]
    columns = ["#", "file", "inputs", "outputs", "max |diff|"]
    console.print(table(f"{pieces_dir} exported to {format}", columns, rows, _right))
    chained = manifest["check"]["chain_max_abs_diff"]
    console.print(f"chained pieces vs PyTorch: max |diff| = {chained:.2g}; wrote {out}/")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
