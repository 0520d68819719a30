"""Did a growth op keep the function? Measure the change of the output, and the cost, on an example input.

>>> import torch, growth
>>> from growth.check import output_change
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> wide = growth.net2wider(net, "0", factor=2.0, seed=0, example_input=torch.randn(2, 4))
>>> output_change(net, wide, (torch.randn(3, 4),)).max_abs < 1e-5
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from growth.errors import GrowthError
from surgery.core.errors import running_on
from surgery.core.util import evaluating
from surgery.graph.flops import count_flops, count_params
from surgery.graph.inputs import Example

RELATIVE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class OutputChange:
    """``max_abs``: max |after(x) - before(x)| over every output tensor; ``scale``: max |before(x)|."""

    max_abs: float
    scale: float

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs

    def within(self, tolerance: float = RELATIVE_TOLERANCE) -> bool:
        return self.max_abs <= tolerance * self.scale


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _example(inputs: Example | Sequence[torch.Tensor]) -> Example:
    return inputs if isinstance(inputs, Example) else Example(tuple(inputs), {})


def output_change(before: nn.Module, after: nn.Module, inputs: Example | Sequence[torch.Tensor]) -> OutputChange:
    """Run both models in eval mode on ``inputs`` (positional tensors or an Example) and compare every output tensor."""
    example = _example(inputs)
    with evaluating(before, after), running_on(tuple(example.tensors())):
        ys, zs = _tensors(example(before)), _tensors(example(after))
    if len(ys) != len(zs) or any(y.shape != z.shape for y, z in zip(ys, zs)):
        return OutputChange(float("inf"), 0.0)
    max_abs = max((float((z - y).abs().max()) for y, z in zip(ys, zs)), default=0.0)
    scale = max((float(y.abs().max()) for y in ys), default=0.0)
    return OutputChange(max_abs, scale)


def check_preserved(
    before: nn.Module, after: nn.Module, inputs: Example | Sequence[torch.Tensor], op: str
) -> OutputChange:
    """Raise :class:`GrowthError` if ``after`` moved the output beyond ``1e-4 * max|before(x)|``."""
    change = output_change(before, after, inputs)
    if not change.within():
        raise GrowthError(
            f"{op} changed the output by {change.max_abs:.3g} (max |y| = {change.scale:.3g}) on the input "
            f"{_example(inputs).describe()}, beyond the tolerance {RELATIVE_TOLERANCE:g} * max|y|; "
            "this is a bug, please report it"
        )
    return change


@torch.no_grad()
def vary_constant_weights(model: nn.Module, generator: torch.Generator | None = None, scale: float = 0.1) -> nn.Module:
    """Give every floating parameter or buffer that starts constant random values around it, in place.

    Freshly built nets start with zero classifier heads (ViT), unit BatchNorm scales and
    statistics, 1e-6 layer scales (ConvNeXt): a preservation check on such a net cannot
    see the layers those weights gate, nor a BatchNorm statistic copied from the wrong
    channel. Running variances stay positive. Returns ``model``.

    >>> import torch
    >>> bn = vary_constant_weights(torch.nn.BatchNorm2d(4), torch.Generator().manual_seed(0))
    >>> bool((bn.weight != 1).all() and (bn.running_var > 0).all())
    True
    """
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.numel() > 1 and bool((t == t.flatten()[0]).all()):
            noise = torch.randn(t.shape, generator=generator, dtype=t.dtype) * scale
            t.copy_(t * noise.exp() if name.endswith("running_var") else t + noise)
    return model


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int


def cost(model: nn.Module, inputs: Example | Sequence[torch.Tensor]) -> Cost:
    """Parameters and forward FLOPs of ``model`` on ``inputs`` (positional tensors or an Example)."""
    example = _example(inputs)
    with running_on(tuple(example.tensors())):
        return Cost(count_params(model), count_flops(model, *example.args, **example.kwargs))
