"""Export pieces to files that run without this library: ONNX (onnxruntime) or ``.pt2`` (``torch.export``).

>>> import tempfile, torch, torchvision, surgery
>>> net = torchvision.models.resnet18(num_classes=10).eval()
>>> pieces = surgery.cut(net, at=["layer1.0.conv2", "layer3"])
>>> out = surgery.export(pieces, tempfile.mkdtemp() + "/r18", "pt2", example=torch.randn(2, 3, 32, 32))
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
(:class:`surgery.cut.PieceInfo`), so a cut inside a residual block shows both the
branch and the block input; a value a piece passes on untouched gets the suffix
``.out`` on its way out (ONNX names a value once).

Before the directory appears, every piece is checked against PyTorch on the example
and on a single sample (so the batch dimension is really dynamic): ONNX pieces in
onnxruntime (CPU) to ``1e-4 * max(1, max|y|)``, ``.pt2`` pieces reloaded with
``torch.export.load`` bit for bit (PyTorch running :func:`without_fused_attention`);
and the chained pieces against the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery._util import atomic_directory, evaluating, first_line
from surgery.cut import Pieces, piece_info
from surgery.errors import SurgeryError, running_on
from surgery.inputs import Example
from surgery.io import prepare_output_dir, versions

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
EXPORTERS = ("auto", "dynamo", "torchscript")
# "auto" tries these in order. On the 80 torchvision classifiers cut in 2 (bench/surgery_zoo.py --onnx-exporter ...),
# dynamo alone exports and matches 80, the TorchScript exporter 69 (it cannot export adaptive pooling to a size that
# does not divide the input, nor weights over 2 GB) but is ~5x faster (median per model); together they get all 80,
# and trying TorchScript first keeps the bench within its time budget.
PREFERRED = ("torchscript", "dynamo")
MANIFEST_FILE = "pieces.json"
FORMAT_VERSION = 1
TOLERANCE = 1e-4  # ONNX: max |onnx - torch| <= TOLERANCE * max(1, max |torch|)
ONNX_INSTALL = "pip install 'xross-surgery[onnx]'"
PROTOBUF_LIMIT = 2**31 - 2**26  # an ONNX file holds < 2 GiB; bigger pieces keep their weights in piece<k>.onnx.data

Values = tuple[torch.Tensor, ...]


class CheckFailed(SurgeryError):
    """The pieces were exported, but the exported files do not compute what PyTorch computes."""


@dataclasses.dataclass
class _Run:
    """What PyTorch computes for one check input: per piece, its arguments and outputs (flat tuples)."""

    args: list[Values]
    outs: list[Values]


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise SurgeryError(f"ONNX export needs onnx and onnxruntime: {ONNX_INSTALL}") from None


@contextlib.contextmanager
def _native_output_to_null() -> Iterator[None]:
    """Point file descriptors 1 and 2 at the null device for the duration: native code writes there directly."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # pragma: no cover - no standard descriptors to silence
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(null)


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence the exporters' prints, warnings, log records and native messages (unless ``verbose``)."""
    if verbose:
        yield
        return
    onnx_log = torch._C._jit_is_onnx_log_enabled()  # the TorchScript exporter turns its log on and leaves it on
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with _native_output_to_null():
                yield
        finally:
            logging.disable(previous)
            torch._C._jit_set_onnx_log_enabled(onnx_log)


def _reason(error: BaseException) -> str:
    """The informative line of an exporter error: the innermost cause's first line, ANSI colours removed."""
    while error.__cause__ is not None:
        error = error.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(error)).strip()


def _flat(value: Any, arity: int) -> tuple[Any, ...]:
    """A boundary value as a tuple (it is one already when it holds several values)."""
    return tuple(value) if arity > 1 else (value,)


def _batched(values: Sequence[Any], what: str) -> Values:
    """``values`` as a tuple of tensors with a batch dimension, or a one-line error naming ``what``."""
    for v in values:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            kind = type(v).__name__ if not isinstance(v, torch.Tensor) else "0-d tensor"
            raise SurgeryError(
                f"{what} is not a batched tensor ({kind}); exported pieces exchange batched tensors only: "
                "cut where only tensors cross (surgery nodes MODEL shows the boundaries)"
            )
    return tuple(values)


def _example_args(pieces: Pieces, example: Any) -> Values:
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
    args = _batched(tuple(example) if isinstance(example, (tuple, list)) else (example,), "the example input")
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


def _copies(values: Values) -> Values:
    """Fresh copies to call a piece (or an exporter) with: a piece may change its inputs in place (``relu_``)."""
    return tuple(v.clone() for v in values)


def _run(pieces: Pieces, args: Values) -> _Run:
    """What PyTorch computes, piece by piece (in the math torch.export captures)."""
    run = _Run([], [])
    values = args
    with without_fused_attention():
        for k, piece in enumerate(pieces):
            run.args.append(_batched(values, f"an input of piece {k}"))
            with running_on(values, f"piece {k}"):
                out = piece(*_copies(values))
            values = _batched(_flat(out, piece_info(piece).out_arity), f"an output of piece {k}")
            run.outs.append(values)
    return run


def io_names(piece: nn.Module) -> tuple[list[str], list[str]]:
    """ONNX-safe input and output names of a piece: its ``in_names``/``out_names``, each used once.

    >>> import torch, torchvision, surgery
    >>> pieces = surgery.cut(torchvision.models.resnet18(), ["layer1.0.conv1", "layer1.0.conv2"])
    >>> io_names(pieces[1])   # the block input goes through piece 1 untouched
    (['layer1_0_conv1', 'maxpool'], ['layer1_0_conv2', 'maxpool.out'])
    """
    info = piece_info(piece)
    ins = list(info.in_names)
    taken = set(ins)
    outs = []
    for name in info.out_names:
        new = name
        while new in taken:
            new += ".out"
        taken.add(new)
        outs.append(new)
    return ins, outs


def _value_entries(names: Sequence[str], values: Sequence[str], tensors: Values) -> list[dict[str, Any]]:
    return [
        {"name": n, "value": v, "shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
        for n, v, t in zip(names, values, tensors)
    ]


def _max_diff(got: Sequence[Any], want: Values) -> tuple[float, float]:
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


# ---------------------------------------------------------------- ONNX


def _onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_run(session: Any, names: Sequence[str], args: Sequence[Any]) -> list[Any]:
    return session.run(None, {n: (a.numpy() if isinstance(a, torch.Tensor) else a) for n, a in zip(names, args)})


def _state_bytes(piece: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in piece.state_dict().values()}.values())


def _name_boundary(model: Any, ins: Sequence[str], outs: Sequence[str]) -> None:
    """Name the inputs and outputs of an ``onnx_ir`` model; a value inside that already has such a name is renamed.

    (The dynamo exporter names inside values after torch.export's nodes, e.g. ``permute_1``,
    and renames outputs without looking, which can leave two values with one name.)
    """
    import onnx_ir as ir

    graph = model.graph
    for i, value in enumerate(list(graph.outputs)):  # an output that is an input, or listed twice, needs its own value
        if value in graph.inputs or value in graph.outputs[:i]:
            node = ir.node("Identity", [value])
            graph.append(node)
            graph.outputs[i] = node.outputs[0]
    boundary = {id(v) for v in (*graph.inputs, *graph.outputs)}
    inside = [v for node in graph for v in node.outputs if id(v) not in boundary]
    taken = {*ins, *outs, *(v.name for v in inside)}
    for value in inside:
        if value.name in ins or value.name in outs:
            n = 1
            while f"{value.name}_{n}" in taken:
                n += 1
            value.name = f"{value.name}_{n}"
            taken.add(value.name)
    for value, name in (*zip(graph.inputs, ins), *zip(graph.outputs, outs)):
        value.name = name


def _export_onnx(piece: nn.Module, args: Values, path: Path, exporter: str, verbose: bool) -> None:
    ins, outs = io_names(piece)
    large = _state_bytes(piece) > PROTOBUF_LIMIT
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
        program = torch.onnx.export(piece, args, dynamo=True, dynamic_shapes=dynamic, verbose=verbose)
        _name_boundary(program.model, ins, outs)
        program.save(str(path), external_data=large)
    else:
        if large:
            raise SurgeryError("the TorchScript exporter writes no single file for weights over 2 GB")
        torch.onnx.export(
            piece,
            args,
            str(path),
            input_names=ins,
            output_names=outs,
            dynamo=False,
            dynamic_axes={n: {0: "batch"} for n in (*ins, *outs)},
            verbose=verbose,
        )


def _onnx_piece(
    k: int, piece: nn.Module, runs: Sequence[_Run], path: Path, exporter: str, check: bool, verbose: bool
) -> tuple[str, float | None, Any]:
    """Export piece ``k`` to ``path`` (trying each exporter in turn); return (exporter, max diff, session)."""
    tried, loadable = [], False
    for how in PREFERRED if exporter == "auto" else (exporter,):
        try:
            with _quiet(verbose), without_fused_attention():
                _export_onnx(piece, _copies(runs[0].args[k]), path, how, verbose)
                session = _onnx_session(path)
        except Exception as e:  # any exporter failure is reported in one line below
            tried.append(f"{how}: {_reason(e)}")
            continue
        loadable = True
        if not check:
            return how, None, session
        names = io_names(piece)[0]
        diffs = [_max_diff(_onnx_run(session, names, r.args[k]), r.outs[k]) for r in runs]
        worst = max(d for d, _ in diffs)
        if all(d <= TOLERANCE * s for d, s in diffs):
            return how, worst, session
        tried.append(f"{how}: onnxruntime differs from PyTorch by {worst:.3g}")
    error = CheckFailed if loadable else SurgeryError
    raise error(f"piece {k} cannot be exported to ONNX ({'; '.join(tried)})")


def _onnx_chain(sessions: Sequence[Any], pieces: Pieces, runs: Sequence[_Run]) -> float:
    """Max |diff| of the chained ONNX pieces vs the whole model; raises past the tolerance."""
    worst = 0.0
    for run in runs:
        values: Sequence[Any] = run.args[0]
        for session, piece in zip(sessions, pieces):
            values = _onnx_run(session, io_names(piece)[0], values)
        diff, scale = _max_diff(values, run.outs[-1])
        if diff > TOLERANCE * scale:
            raise CheckFailed(
                f"the chained ONNX pieces differ from the model by {diff:.3g} at batch size {run.args[0][0].shape[0]} "
                f"(each piece alone is within {TOLERANCE:g}); export fewer pieces or pass check=False"
            )
        worst = max(worst, diff)
    return worst


# ---------------------------------------------------------------- .pt2


def _pt2_piece(
    k: int, piece: nn.Module, runs: Sequence[_Run], path: Path, check: bool, verbose: bool
) -> tuple[float | None, Any]:
    """Export piece ``k`` with ``torch.export`` to ``path``; return (max diff, the reloaded module)."""
    args = _copies(runs[0].args[k])
    batch = torch.export.Dim("batch")
    try:
        with _quiet(verbose), without_fused_attention():
            program = torch.export.export(piece, args, dynamic_shapes=tuple({0: batch} for _ in args))
            torch.export.save(program, str(path))
            again = torch.export.load(str(path)).module()
    except Exception as e:  # torch.export failures are reported in one line
        raise SurgeryError(f"piece {k} cannot be exported with torch.export: {_reason(e)}") from None
    if not check:
        return None, again
    for run in runs:
        with torch.no_grad():
            got = _flat(again(*_copies(run.args[k])), len(run.outs[k]))
        if not all(g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, run.outs[k])):
            diff, _ = _max_diff(got, run.outs[k])
            raise CheckFailed(f"piece {k} reloaded from {path.name} is not bit-identical to PyTorch ({diff:.3g})")
    return 0.0, again


def _pt2_chain(modules: Sequence[Any], runs: Sequence[_Run]) -> float:
    for run in runs:
        values: Any = run.args[0]
        with torch.no_grad():
            for m in modules:
                out = m(*_copies(values))
                values = _flat(out, 2 if isinstance(out, (tuple, list)) else 1)
        if not all(torch.equal(g, w) for g, w in zip(values, run.outs[-1])):
            raise CheckFailed("the chained .pt2 pieces are not bit-identical to the model; check=False keeps them")
    return 0.0


# ---------------------------------------------------------------- the API


def export(
    pieces: nn.Module,
    directory: str | os.PathLike[str],
    format: str = "onnx",
    example: Any = None,
    *,
    force: bool = False,
    check: bool = True,
    exporter: str = "auto",
    verbose: bool = False,
) -> Path:
    """Write each piece of ``pieces`` to ``directory`` as ``piece<k>.onnx`` or ``piece<k>.pt2``, plus ``pieces.json``.

    Args:
        pieces: a :class:`surgery.Pieces` (cut pieces and adapters alike) or one module.
        directory: created atomically; a non-empty one is refused unless ``force``.
        format: ``"onnx"`` (needs ``pip install 'xross-surgery[onnx]'``) or ``"pt2"``.
        example: an input of the first piece (tensor or tuple); default: random, from
            the input shape recorded when the pieces were cut. Any batch size; the
            exported batch dimension is dynamic.
        check: compare every piece, and the chain, with PyTorch before writing
            (ONNX in onnxruntime to ``1e-4 * max(1, max|y|)``; ``.pt2`` bit for bit).
        exporter: ONNX only: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``),
            ``"torchscript"`` (the legacy exporter, ``dynamo=False``) or ``"auto"``: the
            faster TorchScript exporter, then dynamo for a piece it cannot export, or
            not exactly enough. The manifest records which one wrote each piece.
        verbose: let the exporters print their progress and warnings.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`. Raises :class:`SurgeryError` (one
        line) on an unknown format, a non-empty directory, a piece that cannot be
        exported, or a check that fails; nothing is written then.
    """
    if format not in FORMATS:
        raise SurgeryError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    if exporter not in EXPORTERS:
        raise SurgeryError(f"unknown ONNX exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    if format == "onnx":
        _require_onnx()
    target = prepare_output_dir(directory, force)
    seq = pieces if isinstance(pieces, Pieces) else Pieces([pieces])
    with evaluating(seq):
        args = _example_args(seq, example)
        runs = [_run(seq, args), _run(seq, tuple(a[:1] for a in args))]  # the example, and one sample

        def fill(tmp: Path) -> None:
            entries, loaded = [], []
            for k, piece in enumerate(seq):
                path = tmp / f"piece{k}{FORMATS[format]}"
                how: str | None = None
                if format == "onnx":
                    how, diff, runner = _onnx_piece(k, piece, runs, path, exporter, check, verbose)
                else:
                    diff, runner = _pt2_piece(k, piece, runs, path, check, verbose)
                loaded.append(runner)
                info, (ins, outs) = piece_info(piece), io_names(piece)
                entry: dict[str, Any] = {
                    "index": k,
                    "file": path.name,
                    "inputs": _value_entries(ins, info.in_names, runs[0].args[k]),
                    "outputs": _value_entries(outs, info.out_names, runs[0].outs[k]),
                    "max_abs_diff": diff,
                }
                data = path.with_name(path.name + ".data")
                if data.exists():
                    entry["data"] = data.name
                if how is not None:
                    entry["exporter"] = how
                entries.append(entry)
            chain = None
            if check:
                chain = _onnx_chain(loaded, seq, runs) if format == "onnx" else _pt2_chain(loaded, runs)
            del loaded
            manifest = {
                "format": format,
                "format_version": FORMAT_VERSION,
                "batch": "the first dimension of every input and output (ONNX: named batch); dynamic",
                "chain": "piece k+1 takes the outputs of piece k, in order",
                "cuts": list(seq.cuts),
                "opset": _opset(tmp / entries[0]["file"]) if format == "onnx" else None,
                "check": None
                if not check
                else {
                    "batch_sizes": [r.args[0][0].shape[0] for r in runs],
                    "tolerance": f"{TOLERANCE:g} * max(1, max|y|)" if format == "onnx" else "bit-identical",
                    "chain_max_abs_diff": chain,
                },
                "versions": versions(),
                "pieces": entries,
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

        atomic_directory(target, fill)
    return target


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``pieces.json`` of an export directory."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise SurgeryError(f"'{directory}' has no {MANIFEST_FILE}; it is not a directory written by surgery.export")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path} is not valid JSON ({e}); export again") from None
    if not isinstance(data, dict) or data.get("format") not in FORMATS or not isinstance(data.get("pieces"), list):
        raise SurgeryError(f"{path} is not an export manifest (no known 'format' and 'pieces'); export again")
    return data


def describe_values(values: Sequence[dict[str, Any]]) -> str:
    """``'layer1_0_conv2: 64x8x8, maxpool: 64x8x8'`` for a manifest's inputs or outputs."""
    return ", ".join(f"{v['name']}: {'x'.join(map(str, v['shape'])) or 'scalar'}" for v in values)


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
