"""Parameter and FLOP counts (FLOPs from ``torch.utils.flop_counter``: a multiply-add is 2 FLOPs).

Every table of the command-line tools shows FLOPs the same way: **per sample** (the
count on an input divided by its batch size), in a column headed :data:`FLOPS_COLUMN`,
followed by the line :func:`flops_note` that names the input they were counted on:

>>> from surgery.graph.inputs import Example
>>> on = Example.parse(["2,3,64,64"])
>>> FLOPS_COLUMN, per_sample(1.19e9, on)
('FLOPs per sample', 595000000.0)
>>> flops_note(on)
'FLOPs per sample: forward FLOPs counted on float32:2x3x64x64, divided by its batch of 2'
>>> flops_note(Example.parse(["input_ids=int64:1,16", "attention_mask=int64:1,16"]))
'FLOPs per sample: forward FLOPs counted on input_ids=int64:1x16, attention_mask=int64:1x16'

A sentence names its input the same way: ``74M FLOPs per sample on float32:1x3x32x32``
(:func:`input_text`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from surgery.core.util import evaluating
from surgery.graph.inputs import Example, InputSpec

FLOPS_COLUMN = "FLOPs per sample"
"""The header of every FLOPs column of the command-line tools' tables."""

CountedOn = Example | Sequence[InputSpec] | str
"""The input FLOPs were counted on: the example itself, or its specs (as a log or recipe records them), or
the description of a batch-1 input whose shape varies by row (``"float32:1x3xRxR, R the row's resolution"``)."""


def count_params(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Number of distinct parameter elements in the module(s); shared tensors count once.

    >>> import torch, surgery
    >>> layer = torch.nn.Linear(8, 4)
    >>> surgery.count_params(layer), surgery.count_params([layer, layer])  # shared weights count once
    (36, 36)
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def count_flops(module: nn.Module, *inputs: Any, **kw_inputs: Any) -> int:
    """Forward FLOPs of ``module(*inputs, **kw_inputs)`` (run in eval mode, mode restored afterwards).

    >>> import torch, surgery
    >>> surgery.count_flops(torch.nn.Linear(8, 4), torch.randn(2, 8))  # 2 samples x 8 x 4 multiply-adds x 2
    128
    """
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


def _specs(on: Example | Sequence[InputSpec]) -> list[InputSpec]:
    return on.specs() if isinstance(on, Example) else list(on)


def batch_size(on: CountedOn) -> int:
    """The batch size of an input: the leading dimension of its first tensor (1 when it has none, or for a text)."""
    specs = [] if isinstance(on, str) else _specs(on)
    return specs[0].shape[0] if specs and len(specs[0].shape) > 1 else 1


def input_text(on: CountedOn) -> str:
    """The input FLOPs were counted on, shortly: ``float32:1x3x32x32``."""
    return on if isinstance(on, str) else ", ".join(map(str, _specs(on))) or "no tensor input"


def per_sample(flops: float, on: CountedOn) -> float:
    """FLOPs counted on the input ``on``, per sample of its batch."""
    return flops / batch_size(on)


def flops_note(on: CountedOn) -> str:
    """The line printed under a table whose :data:`FLOPS_COLUMN` was counted on ``on`` (see the module doc)."""
    batch = batch_size(on)
    divided = f", divided by its batch of {batch}" if batch > 1 else ""
    return f"{FLOPS_COLUMN}: forward FLOPs counted on {input_text(on)}{divided}"
