"""``surgery``: list cut points, cut, stitch and draw networks from the shell.

    surgery nodes resnet50 --depth 2
    surgery cut resnet50 --at layer2 --out resnet50-cut
    surgery stitch resnet18-cut:0 resnet50-cut:1 --out hybrid
    surgery show hybrid --out hybrid.svg
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from surgery.adapters import stitch as stitch_pieces
from surgery.clikit import console, default_input_shape, load_model_arg, parse_shape, run_app, table
from surgery.cut import Pieces, cut as cut_model, piece_info
from surgery.cutpoints import cut_points
from surgery.errors import SurgeryError, running_on
from surgery.flops import human
from surgery.io import load, prepare_output_dir, save
from surgery.render import render

app = typer.Typer(help="Cut trained networks into exact pieces, stitch pieces of different networks, draw them.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ModelArg = Annotated[str, typer.Argument(help="torchvision model name, package.module:callable, or a saved directory")]
InputOpt = Annotated[Optional[str], typer.Option("--input", help="example input shape, e.g. 1,3,224,224 (default: the model's)")]
ClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="classifier outputs (torchvision models)")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="local state_dict file (.safetensors, or torch file read with weights_only)")]
LeafOpt = Annotated[Optional[list[str]], typer.Option("--leaf", help="module path to keep as one call when tracing (repeatable)")]
TrustOpt = Annotated[bool, typer.Option("--trust-code", help="allow saved recipes that import code outside torchvision")]


def _example(model_name: str, input_shape: str | None) -> torch.Tensor:
    shape = parse_shape(input_shape) if input_shape else default_input_shape(model_name)
    return torch.randn(*shape)


def _right(col: str) -> str:
    return "right" if col in ("params", "FLOPs", "#", "crossing", "params so far", "FLOPs so far") else "left"


@app.command()
def nodes(
    model: ModelArg,
    input: InputOpt = None,
    depth: Annotated[int, typer.Option(help="deepest module path level to list (layer2 is 1, layer2.1 is 2)")] = 2,
    all_nodes: Annotated[bool, typer.Option("--nodes/--no-nodes", help="also list fx node names")] = False,
    num_classes: ClassesOpt = None,
    weights: WeightsOpt = None,
    leaf: LeafOpt = None,
    trust_code: TrustOpt = False,
) -> None:
    """Table of the places MODEL can be cut, with shapes, parameters and FLOPs so far."""
    net = load_model_arg(model, num_classes=num_classes, weights=weights, trust_code=trust_code)
    points = cut_points(net, _example(model, input), depth=depth, include_nodes=all_nodes, leaf_modules=leaf or [])
    rows = [(p.name, p.kind, p.shape, p.crossing, human(p.params), human(p.flops or 0)) for p in points]
    console.print(table(f"cut points of {model}", ["name", "kind", "output", "crossing", "params so far", "FLOPs so far"], rows, _right))


def _pieces_table(title: str, pieces: Pieces, example: torch.Tensor) -> None:
    rows = [(s.index, s.inputs, s.outputs, human(s.params), human(s.flops)) for s in pieces.summary(example)]
    console.print(table(title, ["#", "input", "output", "params", "FLOPs"], rows, _right))


@app.command()
def cut(
    model: ModelArg,
    at: Annotated[list[str], typer.Option("--at", help="cut after this module path or fx node (repeat for more cuts)")],
    out: Annotated[Optional[Path], typer.Option(help="output directory (default ./MODEL-cut)")] = None,
    input: InputOpt = None,
    num_classes: ClassesOpt = None,
    weights: WeightsOpt = None,
    leaf: LeafOpt = None,
    render_graph: Annotated[bool, typer.Option("--render", help="also draw the pieces to OUT/pieces.svg (or .dot)")] = False,
    force: Annotated[bool, typer.Option(help="replace a non-empty output directory")] = False,
    trust_code: TrustOpt = False,
) -> None:
    """Cut MODEL after each --at point, check the pieces reproduce it exactly, save them."""
    target = out or Path(f"{Path(model).name.replace(':', '_')}-cut")
    prepare_output_dir(target, force)  # refuse early, before any work
    net = load_model_arg(model, num_classes=num_classes, weights=weights, trust_code=trust_code).eval()
    x = _example(model, input)
    pieces = cut_model(net, at, x, leaf_modules=leaf or [])
    with torch.no_grad(), running_on(x):
        diff = (pieces(x) - net(x)).abs().max().item()
    _pieces_table(f"{model} cut at {', '.join(at)}", pieces, x)
    colour = "green" if diff == 0 else "red"
    console.print(f"max |pieces(x) - model(x)| = [{colour}]{diff:g}[/] on a random {tuple(x.shape)} input (eval mode)")
    save(pieces, target, force=force)
    console.print(f"saved {len(pieces)} pieces to {target}/")
    if render_graph:
        try:
            console.print(f"drew {render(pieces, target / 'pieces.svg')}")
        except SurgeryError as e:
            console.print(f"[yellow]{e}[/]")


def _piece_ref(ref: str, trust_code: bool) -> torch.nn.Module:
    directory, sep, index = ref.rpartition(":")
    if not sep or not index.lstrip("-").isdigit():
        raise SurgeryError(f"'{ref}' is not DIR:INDEX (e.g. resnet18-cut:0)")
    pieces = load(directory, trust_code=trust_code)
    if not isinstance(pieces, Pieces):
        raise SurgeryError(f"'{directory}' holds a whole model, not pieces; cut it first (surgery cut)")
    i = int(index)
    if not -len(pieces) <= i < len(pieces):
        raise SurgeryError(f"'{directory}' has {len(pieces)} pieces; index {i} is out of range")
    return pieces[i]


@app.command()
def stitch(
    up: Annotated[str, typer.Argument(help="DIR:INDEX of the upstream piece")],
    down: Annotated[str, typer.Argument(help="DIR:INDEX of the downstream piece")],
    out: Annotated[Path, typer.Option(help="output directory")],
    input: InputOpt = None,
    adapter: Annotated[bool, typer.Option("--adapter/--no-adapter", help="insert a 1x1 adapter where the shapes differ")] = True,
    batchnorm: Annotated[bool, typer.Option(help="BatchNorm in the adapter")] = False,
    force: Annotated[bool, typer.Option(help="replace a non-empty output directory")] = False,
    trust_code: TrustOpt = False,
) -> None:
    """Join UP's piece to DOWN's piece (with an adapter where needed) and save the result."""
    prepare_output_dir(out, force)
    up_piece, down_piece = _piece_ref(up, trust_code), _piece_ref(down, trust_code)
    specs = piece_info(up_piece).in_specs
    if input:
        x = torch.randn(*parse_shape(input))
    elif specs and all(s.is_tensor for s in specs):
        x = torch.randn(1, *specs[0].shape)
    else:
        raise SurgeryError("the up piece has no recorded input shape; pass --input 1,3,224,224")
    hybrid = stitch_pieces(up_piece, down_piece, x, allow_adapter=adapter, batchnorm=batchnorm).eval()
    _pieces_table(f"{up} + {down}", hybrid, x)
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


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
