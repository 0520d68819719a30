"""``.pt2`` files: each piece exported with ``torch.export``, reloaded and checked bit for bit against PyTorch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.exporters.checks import CheckFailed, Run, copies, flat, max_diff, without_fused_attention
from surgery.exporters.quiet import quiet, reason


def pt2_piece(
    k: int, piece: nn.Module, runs: Sequence[Run], path: Path, check: bool, verbose: bool
) -> tuple[float | None, Any]:
    """Export piece ``k`` with ``torch.export`` to ``path``; return (max diff, the reloaded module)."""
    args = copies(runs[0].args[k])
    batch = torch.export.Dim("batch")
    try:
        with quiet(verbose), without_fused_attention():
            program = torch.export.export(piece, args, dynamic_shapes=tuple({0: batch} for _ in args))
            torch.export.save(program, str(path))
            again = torch.export.load(str(path)).module()
    except Exception as e:  # torch.export failures are reported in one line
        raise SurgeryError(f"piece {k} cannot be exported with torch.export: {reason(e)}") from None
    if not check:
        return None, again
    for run in runs:
        with torch.no_grad():
            got = flat(again(*copies(run.args[k])), len(run.outs[k]))
        if not all(g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, run.outs[k])):
            diff, _ = max_diff(got, run.outs[k])
            raise CheckFailed(f"piece {k} reloaded from {path.name} is not bit-identical to PyTorch ({diff:.3g})")
    return 0.0, again


def pt2_chain(modules: Sequence[Any], runs: Sequence[Run]) -> float:
    """The chained reloaded ``.pt2`` modules vs the whole model: 0.0, or :class:`CheckFailed` if not bit-identical."""
    for run in runs:
        values: Any = run.args[0]
        with torch.no_grad():
            for m in modules:
                out = m(*copies(values))
                values = flat(out, 2 if isinstance(out, (tuple, list)) else 1)
        if not all(torch.equal(g, w) for g, w in zip(values, run.outs[-1])):
            raise CheckFailed("the chained .pt2 pieces are not bit-identical to the model; check=False keeps them")
    return 0.0
