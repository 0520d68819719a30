"""Running the pieces in PyTorch, as ``torch.export`` captures them, and comparing exported files with that.

What PyTorch computes for each check input (:class:`Run`) is the reference the ONNX and
``.pt2`` files are held to; :class:`CheckFailed` is raised when they do not match it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.fx.graph import CodeGen

from surgery.core.errors import SurgeryError, running_on
from surgery.core.specs import known_specs
from surgery.graph.capture import copy_graph
from surgery.graph.inputs import Example
from surgery.pieces.cut import META_KEY, Pieces, piece_info

Values = tuple[torch.Tensor, ...]


class CheckFailed(SurgeryError):
    """The pieces were exported, but the exported files do not compute what PyTorch computes."""


@dataclasses.dataclass
class Run:
    """What PyTorch computes for one check input: per piece, its arguments and outputs (flat tuples)."""

    args: list[Values]
    outs: list[Values]


def flat(value: Any, arity: int) -> tuple[Any, ...]:
    """A boundary value as a tuple (it is one already when it holds several values)."""
    return tuple(value) if arity > 1 else (value,)


def batched(values: Sequence[Any], what: str) -> Values:
    """``values`` as a tuple of tensors with a batch dimension, or a one-line error naming ``what``."""
    for v in values:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            kind = type(v).__name__ if not isinstance(v, torch.Tensor) else "0-d tensor"
            raise SurgeryError(
                f"{what} is not a batched tensor ({kind}); exported pieces exchange batched tensors only: "
                "cut where only tensors cross (surgery nodes MODEL shows the boundaries)"
            )
    return tuple(values)


def _positional(pieces: Pieces, example: Example) -> tuple[Any, ...]:
    """An example's inputs in the order the first piece takes them (keyword inputs by their names)."""
    names = piece_info(pieces[0]).in_names
    given = dict(zip(names, example.args))
    unknown = [k for k in example.kwargs if k not in names[len(example.args) :]]
    if unknown:
        raise SurgeryError(
            f"the first piece takes no input '{unknown[0]}' (it takes {', '.join(names)}); name its inputs"
        )
    given.update(example.kwargs)
    missing = [n for n in names[: len(given)] if n not in given]
    if missing:
        raise SurgeryError(
            f"the example gives {', '.join(example.kwargs)} but not '{missing[0]}' before them; "
            f"exported pieces take their inputs in the order {', '.join(names)}: give '{missing[0]}' too"
        )
    return tuple(given[n] for n in names[: len(given)])


def example_args(pieces: Pieces, example: Any) -> Values:
    """The tracing example: the given one (or random, from the recorded input specs), at batch size >= 2.

    Keyword inputs (an :class:`~surgery.graph.inputs.Example` or a dict) are put in the order
    the first piece takes them, so an exported piece's inputs are named after them.
    """
    if isinstance(example, dict):
        example = Example((), dict(example))
    if isinstance(example, Example):
        example = _positional(pieces, example)
    if example is None:
        specs = known_specs(piece_info(pieces[0]).in_specs) or ()
        shapes = [s.shape for s in specs if s.is_tensor and s.shape is not None]
        if not specs or len(shapes) < len(specs):
            raise SurgeryError(
                "the pieces carry no recorded input shape; pass example_input= (CLI: --input 1,3,224,224)"
            )
        example = tuple(
            torch.randn(2, *shape)
            if getattr(torch, s.dtype or "float32").is_floating_point
            else torch.zeros(2, *shape, dtype=getattr(torch, s.dtype or "int64"))
            for s, shape in zip(specs, shapes)
        )
    args = batched(tuple(example) if isinstance(example, (tuple, list)) else (example,), "the example input")
    if len({a.shape[0] for a in args}) != 1:
        sizes = [a.shape[0] for a in args]
        raise SurgeryError(f"the example inputs have different batch sizes {sizes}; give them one batch size")
    # torch.export treats a size of 1 as a constant, so trace with two samples (the second a copy)
    return tuple(torch.cat([a, a]) for a in args) if args[0].shape[0] == 1 else args


@contextlib.contextmanager
def without_fused_attention() -> Iterator[None]:
    """Run attention (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) without its fused inference kernel.

    In eval mode without autograd PyTorch swaps in a fused kernel that ``torch.export``
    does not capture; with it off, PyTorch computes what the exported program computes,
    bit for bit (the two differ by rounding, ~1e-7).
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _flat_piece(piece: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A copy of the last piece returning its outputs as a flat tuple, named by where they sat (a ModelOutput's keys).

    Exported files return tensors, not a ``ModelOutput`` or a dict: ``logits`` stays the
    name of the logits. The copy shares the piece's parameters.
    """
    graph = copy_graph(piece.graph)
    graph._codegen = CodeGen()
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = pytree.tree_leaves(output.args[0])
    output.args = (tuple(leaves) if len(leaves) > 1 else leaves[0],)
    flat = fx.GraphModule(piece, graph, class_name="Piece")
    flat.train(piece.training)
    flat.meta[META_KEY] = dataclasses.replace(piece_info(piece), out_names=tuple(names), out_specs=None)
    return flat


def _key_name(path: tuple[Any, ...]) -> str:
    """``['logits']`` -> ``logits``, ``[0][1]`` -> ``output.0.1``: an ONNX-safe name of a place in an output."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    name = ".".join(parts)
    return f"output.{name}" if not parts or parts[0].isdigit() else name


def output_names(piece: Any) -> list[str] | None:
    """Names of the values a cut piece's graph returns inside a structure (a ModelOutput, a dict); None otherwise."""
    graph = getattr(piece, "graph", None)
    if not isinstance(graph, fx.Graph) or piece_info(piece).out_arity != 1:
        return None
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    codegen = graph._codegen
    tree = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
    structure = pytree.tree_unflatten(list(range(tree.num_leaves)), tree) if tree is not None else output.args[0]
    paths = [path for path, _ in pytree.tree_flatten_with_path(structure)[0]]
    if not paths or paths == [()]:
        return None
    return [_key_name(path) for path in paths]


def flat_outputs(pieces: Pieces) -> Pieces:
    """``pieces`` with the last one returning a flat tuple when its graph returns a structure (else as they are)."""
    names = output_names(pieces[-1])
    if names is None:
        return pieces
    return Pieces([*pieces.pieces[:-1], _flat_piece(pieces[-1], names)], pieces.cuts)


def copies(values: Values) -> Values:
    """Fresh copies to call a piece (or an exporter) with: a piece may change its inputs in place (``relu_``)."""
    return tuple(v.clone() for v in values)


def run_pieces(pieces: Pieces, args: Values) -> Run:
    """What PyTorch computes, piece by piece (in the math torch.export captures)."""
    run = Run([], [])
    values = args
    with without_fused_attention():
        for k, piece in enumerate(pieces):
            run.args.append(batched(values, f"an input of piece {k}"))
            with running_on(values, f"piece {k}"):
                out = piece(*copies(values))
            values = batched(flat(out, piece_info(piece).out_arity), f"an output of piece {k}")
            run.outs.append(values)
    return run


def max_diff(got: Sequence[Any], want: Values) -> tuple[float, float]:
    """``(max |got - want|, max(1, max |want|))`` over all outputs."""
    diff, scale = 0.0, 1.0
    for g, w in zip(got, want):
        g = torch.as_tensor(g)
        if g.shape != w.shape:
            return float("inf"), scale
        if w.numel():
            diff = max(diff, (g.to(w.dtype) - w).abs().max().item() if w.is_floating_point() else float((g != w).any()))
            scale = max(scale, w.abs().max().item() if w.is_floating_point() else 1.0)
    return diff, scale
