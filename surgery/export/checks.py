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

from surgery.cut import Pieces, piece_info
from surgery.errors import SurgeryError, running_on
from surgery.inputs import Example

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


def example_args(pieces: Pieces, example: Any) -> Values:
    """The tracing example: the given one (or random, from the recorded input specs), at batch size >= 2."""
    if isinstance(example, Example):
        if example.kwargs:
            raise SurgeryError(
                "export takes pieces called with positional inputs; these take keyword inputs "
                f"({', '.join(example.kwargs)})"
            )
        example = example.args
    if example is None:
        specs = piece_info(pieces[0]).in_specs
        if not specs or not all(s.is_tensor and s.shape is not None for s in specs):
            raise SurgeryError("the pieces carry no recorded input shape; pass example= (CLI: --input 1,3,224,224)")
        example = tuple(
            torch.randn(2, *s.shape)
            if getattr(torch, s.dtype or "float32").is_floating_point
            else torch.zeros(2, *s.shape, dtype=getattr(torch, s.dtype or "int64"))
            for s in specs
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
