"""Export pieces to files that run without this library: ONNX (onnxruntime) or ``.pt2`` (``torch.export``).

>>> import tempfile, torch, torchvision, surgery
>>> net = torchvision.models.resnet18(num_classes=10).eval()
>>> pieces = surgery.cut(net, at=["layer1.0.conv2", "layer3"])
>>> out = surgery.export(pieces, tempfile.mkdtemp() + "/r18", "pt2", example_input=torch.randn(2, 3, 32, 32))
>>> sorted(p.name for p in out.iterdir())
['piece0.pt2', 'piece1.pt2', 'piece2.pt2', 'pieces.json']
>>> m = read_manifest(out)
>>> [(v["name"], v["shape"]) for v in m["pieces"][1]["inputs"]]   # a cut inside a block: 2 values
[('layer1_0_conv2', [64, 8, 8]), ('maxpool', [64, 8, 8])]
>>> again = torch.export.load(out / "piece1.pt2").module()
>>> a, b = pieces[0](torch.randn(5, 3, 32, 32))                  # any batch size
>>> torch.equal(again(a, b), pieces[1](a, b))
True

The directory holds ``piece<k>.onnx`` (or ``.pt2``) per piece and ``pieces.json``, the
manifest: for each piece its file and its inputs and outputs (name, per-sample shape,
dtype; the first dimension of every one is the batch, dynamic). Piece k+1 takes piece
k's outputs in order. Values are named after the fx values that cross the cut
(:class:`surgery.pieces.cut.PieceInfo`), so a cut inside a residual block shows both the
branch and the block input; a value a piece passes on untouched gets the suffix
``.out`` on its way out (ONNX names a value once). The first piece's inputs keep the
model's names (``input_ids``, ``attention_mask``: give a keyword example as a dict); the
last piece returns the tensors of the model's output structure, each named by its place
(a ``ModelOutput``'s ``logits``).

Before the directory appears, every piece is checked against PyTorch on the example
and on a single sample (so the batch dimension is really dynamic): ONNX pieces in
onnxruntime (CPU) to ``1e-4 * max(1, max|y|)``, ``.pt2`` pieces reloaded with
``torch.export.load`` bit for bit (PyTorch running :func:`without_fused_attention`);
and the chained pieces against the whole model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from surgery.core.errors import SurgeryError, renamed_argument
from surgery.core.util import atomic_directory, evaluating
from surgery.exporters.checks import CheckFailed, example_args, flat_outputs, run_pieces, without_fused_attention
from surgery.exporters.manifest import FORMATS, describe_values, io_names, piece_entry, read_manifest, write_manifest
from surgery.exporters.onnx import EXPORTERS, TOLERANCE, onnx_chain, onnx_opset, onnx_piece, require_onnx
from surgery.exporters.pt2 import pt2_chain, pt2_piece
from surgery.files.io import prepare_output_dir
from surgery.pieces.cut import Pieces


def export(
    pieces: nn.Module,
    directory: str | os.PathLike[str],
    format: str = "onnx",
    example_input: Any = None,
    *,
    force: bool = False,
    check: bool = True,
    exporter: str = "auto",
    verbose: bool = False,
    example: Any = None,
) -> Path:
    """Write each piece of ``pieces`` to ``directory`` as ``piece<k>.onnx`` or ``piece<k>.pt2``, plus ``pieces.json``.

    Args:
        pieces: a :class:`surgery.Pieces` (cut pieces and adapters alike) or one module.
        directory: created atomically; a non-empty one is refused unless ``force``.
        format: ``"onnx"`` (needs ``pip install 'xross-surgery[onnx]'``) or ``"pt2"``.
        example_input: an input of the first piece (tensor, tuple, or a dict or
            :class:`~surgery.graph.inputs.Example` of keyword inputs); default: random, from
            the input shape recorded when the pieces were cut. Any batch size; the
            exported batch dimension is dynamic.
        check: compare every piece, and the chain, with PyTorch before writing
            (ONNX in onnxruntime to ``1e-4 * max(1, max|y|)``; ``.pt2`` bit for bit).
        exporter: ONNX only: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``),
            ``"torchscript"`` (the legacy exporter, ``dynamo=False``) or ``"auto"``: the
            faster TorchScript exporter, then dynamo for a piece it cannot export, or
            not exactly enough. The manifest records which one wrote each piece.
        verbose: let the exporters print their progress and warnings.
        example: the former name of ``example_input`` (still accepted, with a ``FutureWarning``).

    Returns:
        ``directory`` as a :class:`~pathlib.Path`. Raises :class:`SurgeryError` (one
        line) on an unknown format, a non-empty directory, a piece that cannot be
        exported, or a check that fails; nothing is written then.

    It is also a method of :class:`surgery.Pieces`, with the same arguments:

    >>> import tempfile, torch, torchvision, surgery
    >>> pieces = surgery.cut(torchvision.models.resnet18(num_classes=10).eval(), "layer2")
    >>> out = pieces.export(tempfile.mkdtemp() + "/r18", "pt2", example_input=torch.randn(2, 3, 32, 32))
    >>> sorted(p.name for p in out.iterdir())
    ['piece0.pt2', 'piece1.pt2', 'pieces.json']
    """
    example_input = renamed_argument("export", "example_input", example_input, "example", example)
    if format not in FORMATS:
        raise SurgeryError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    if exporter not in EXPORTERS:
        raise SurgeryError(f"unknown ONNX exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    if format == "onnx":
        require_onnx()
    target = prepare_output_dir(directory, force)
    seq = flat_outputs(pieces if isinstance(pieces, Pieces) else Pieces([pieces]))
    with evaluating(seq):
        args = example_args(seq, example_input)
        runs = [run_pieces(seq, args), run_pieces(seq, tuple(a[:1] for a in args))]  # the example, and one sample

        def fill(tmp: Path) -> None:
            entries, loaded = [], []
            for k, piece in enumerate(seq):
                path = tmp / f"piece{k}{FORMATS[format]}"
                how: str | None = None
                if format == "onnx":
                    how, diff, runner = onnx_piece(k, piece, runs, path, exporter, check, verbose)
                else:
                    diff, runner = pt2_piece(k, piece, runs, path, check, verbose)
                loaded.append(runner)
                entries.append(piece_entry(k, piece, path, runs[0].args[k], runs[0].outs[k], diff, how))
            chain = None
            if check:
                chain = onnx_chain(loaded, seq, runs) if format == "onnx" else pt2_chain(loaded, runs)
            del loaded
            write_manifest(
                tmp,
                format=format,
                cuts=list(seq.cuts),
                opset=onnx_opset(tmp / entries[0]["file"]) if format == "onnx" else None,
                check=None
                if not check
                else {
                    "batch_sizes": [r.args[0][0].shape[0] for r in runs],
                    "tolerance": f"{TOLERANCE:g} * max(1, max|y|)" if format == "onnx" else "bit-identical",
                    "chain_max_abs_diff": chain,
                },
                entries=entries,
            )

        atomic_directory(target, fill)
    return target


# ``pieces.export(directory, ...)``: bound here, where export lives (surgery.cut cannot import this package back)
Pieces.export = export  # type: ignore[attr-defined]

__all__ = [
    "CheckFailed",
    "EXPORTERS",
    "FORMATS",
    "describe_values",
    "export",
    "io_names",
    "read_manifest",
    "without_fused_attention",
]
