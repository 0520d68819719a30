"""Parameter and FLOP counts (FLOPs from ``torch.utils.flop_counter``: a multiply-add is 2 FLOPs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from surgery._util import evaluating


def count_params(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Number of distinct parameter elements in the module(s); shared tensors count once."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def count_flops(module: nn.Module, *inputs: Any, **kw_inputs: Any) -> int:
    """Forward FLOPs of ``module(*inputs, **kw_inputs)`` (run in eval mode, mode restored afterwards)."""
    with evaluating(module), FlopCounterMode(display=False) as counter:
        module(*inputs, **kw_inputs)
    return int(counter.get_total_flops())


def human(n: float, unit: str = "") -> str:
    """``1234567 -> '1.23M'``."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def parse_human(text: str) -> float:
    """``'12M' -> 12e6``; accepts k, M, G, T suffixes (case-insensitive for k)."""
    text = text.strip()
    scale = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    if text and text[-1] in scale:
        return float(text[:-1]) * scale[text[-1]]
    return float(text)
