"""ONNX files: the dynamo and TorchScript exporters, and the check of each piece and the chain in onnxruntime."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.exporters.checks import CheckFailed, Run, Values, copies, max_diff, without_fused_attention
from surgery.exporters.manifest import io_names
from surgery.exporters.quiet import quiet, reason

EXPORTERS = ("auto", "dynamo", "torchscript")
# "auto" tries these in order. On the 80 torchvision classifiers cut in 2 (bench/surgery_zoo.py --onnx-exporter ...),
# dynamo alone exports and matches 80, the TorchScript exporter 69 (it cannot export adaptive pooling to a size that
# does not divide the input, nor weights over 2 GB) but is ~5x faster (median per model); together they get all 80,
# and trying TorchScript first keeps the bench within its time budget.
PREFERRED = ("torchscript", "dynamo")
TOLERANCE = 1e-4  # ONNX: max |onnx - torch| <= TOLERANCE * max(1, max |torch|)
ONNX_INSTALL = "pip install 'xross-surgery[onnx]'"
PROTOBUF_LIMIT = 2**31 - 2**26  # an ONNX file holds < 2 GiB; bigger pieces keep their weights in piece<k>.onnx.data


def require_onnx() -> None:
    """Raise a one-line :class:`SurgeryError` naming the extra to install when onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise SurgeryError(f"ONNX export needs onnx and onnxruntime: {ONNX_INSTALL}") from None


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
    ins = ins[: len(args)]  # the first piece may take optional inputs the example does not give
    large = _state_bytes(piece) > PROTOBUF_LIMIT
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
        program = torch.onnx.export(piece, args, dynamo=True, dynamic_shapes=dynamic, verbose=verbose)
        assert program is not None, "dynamo=True hands back the program"
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


def _exporters(piece: nn.Module) -> tuple[str, ...]:
    """The exporters ``"auto"`` tries on ``piece``: dynamo alone for a torch.export graph that reads sizes as ints.

    The TorchScript exporter traces such sizes (``aten.sym_size.int``) as the example's
    numbers, so its file would refuse any other batch size or length.
    """
    graph = getattr(piece, "graph", None)
    reads_sizes = isinstance(graph, torch.fx.Graph) and any(
        n.target is torch.ops.aten.sym_size.int for n in graph.nodes
    )
    return ("dynamo",) if reads_sizes else PREFERRED


def onnx_piece(
    k: int, piece: nn.Module, runs: Sequence[Run], path: Path, exporter: str, check: bool, verbose: bool
) -> tuple[str, float | None, Any]:
    """Export piece ``k`` to ``path`` (trying each exporter in turn); return (exporter, max diff, session)."""
    tried, loadable = [], False
    for how in _exporters(piece) if exporter == "auto" else (exporter,):
        try:
            with quiet(verbose), without_fused_attention():
                _export_onnx(piece, copies(runs[0].args[k]), path, how, verbose)
                session = _onnx_session(path)
        except Exception as e:  # any exporter failure is reported in one line below
            tried.append(f"{how}: {reason(e)}")
            continue
        loadable = True
        if not check:
            return how, None, session
        names = io_names(piece)[0]
        try:
            diffs = [max_diff(_onnx_run(session, names, r.args[k]), r.outs[k]) for r in runs]
        except Exception as e:  # the file loads but onnxruntime cannot run it (a size fixed at export, say)
            tried.append(f"{how}: onnxruntime cannot run it ({reason(e)})")
            continue
        worst = max(d for d, _ in diffs)
        if all(d <= TOLERANCE * s for d, s in diffs):
            return how, worst, session
        tried.append(f"{how}: onnxruntime differs from PyTorch by {worst:.3g}")
    error = CheckFailed if loadable else SurgeryError
    raise error(f"piece {k} cannot be exported to ONNX ({'; '.join(tried)})")


def onnx_chain(sessions: Sequence[Any], pieces: Iterable[nn.Module], runs: Sequence[Run]) -> float:
    """Max |diff| of the chained ONNX pieces vs the whole model; raises past the tolerance."""
    worst = 0.0
    for run in runs:
        values: Sequence[Any] = run.args[0]
        for session, piece in zip(sessions, pieces):
            values = _onnx_run(session, io_names(piece)[0], values)
        diff, scale = max_diff(values, run.outs[-1])
        if diff > TOLERANCE * scale:
            raise CheckFailed(
                f"the chained ONNX pieces differ from the model by {diff:.3g} at batch size {run.args[0][0].shape[0]} "
                f"(each piece alone is within {TOLERANCE:g}); export fewer pieces or pass check=False"
            )
        worst = max(worst, diff)
    return worst


def onnx_opset(path: Path) -> int | None:
    """The default-domain opset an ONNX file was written for."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
