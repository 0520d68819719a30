"""Exit heads: a light classifier after every part of every net, so that a computation stopped early still answers.

Net ``i``'s head at boundary ``b`` reads what part ``b`` of net ``i`` returns, on its own path or on a
stitched one (a *prefix* ``(.., i)`` of length ``b + 1``: after the first ``b + 1`` parts). The last
part needs no head: it ends with the net's own classifier. A cohort of K nets cut into P parts has
``K * (P - 1)`` heads.

The default head (:class:`PoolLinear`) averages a 4-D feature map over its spatial positions or a
sequence over its tokens and applies one linear layer. ``exit_head="module:callable"`` names another:
it is called as ``callable(channels, num_classes)`` and must return a module mapping the feature to
logits.

>>> import torch
>>> heads = ExitHeads.build([[(64, 8, 8), (128, 4, 4)], [(32, 8, 8), (96, 4, 4)]], num_classes=10)
>>> sorted(heads.heads)
['n0_b0', 'n0_b1', 'n1_b0', 'n1_b1']
>>> heads.logits((1, 0), torch.zeros(2, 32, 8, 8)).shape      # net 0's head after part 1, on a stitched prefix
Traceback (most recent call last):
...
ValueError: ...
>>> heads.logits((1, 0), torch.zeros(2, 128, 4, 4)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.core.trust import Kind, resolve
from xross.data.labels import hard_label_ce
from xross.errors import XrossError

Prefix = tuple[int, ...]
HeadFactory = Callable[[int, int], nn.Module]


class PoolLinear(nn.Module):
    """Global average pool (4-D maps) or token mean (sequences), then one linear layer."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.mean((2, 3))
        elif x.dim() == 3:
            x = x.mean(1)
        return self.fc(x.flatten(1))


def feature(value: Any) -> torch.Tensor:
    """The tensor a head reads from a boundary value: the value itself, or the first of several (hidden states)."""
    return value[0] if isinstance(value, tuple) else value


def channels_of(shape: Sequence[int]) -> int:
    """A feature's width from its per-sample shape: channels of a map ``(C, H, W)``, the last dim of a sequence."""
    if len(shape) == 3:
        return int(shape[0])
    if len(shape) in (1, 2):
        return int(shape[-1])
    raise XrossError(f"an exit head needs a feature of shape (C,H,W), (L,D) or (D,); this boundary has {tuple(shape)}")


def head_factory(spec: str | None, *, trust_code: bool = False) -> HeadFactory:
    """The default head, or the ``module:callable`` ``spec`` names (resolved under :mod:`surgery.core.trust`)."""
    if spec is None:
        return PoolLinear
    try:
        return resolve(spec, kind=Kind.MODEL_SOURCE, trust_code=trust_code, what="the exit head")
    except SurgeryError as e:
        raise XrossError(str(e)) from None


def head_key(net: int, boundary: int) -> str:
    return f"n{net}_b{boundary}"


class ExitHeads(nn.Module):
    """Every exit head of a cohort, by net and boundary (``n0_b1``: net 0 after its part 1)."""

    def __init__(self, heads: Mapping[str, nn.Module], num_nets: int, num_boundaries: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(dict(heads))
        self.num_nets = num_nets
        self.num_boundaries = num_boundaries

    @classmethod
    def build(
        cls, shapes: Sequence[Sequence[Sequence[int]]], num_classes: int, factory: HeadFactory = PoolLinear
    ) -> ExitHeads:
        """Heads for ``shapes[net][boundary]``: the per-sample shape of each net's features at each boundary."""
        heads = {}
        for net, per_boundary in enumerate(shapes):
            for b, shape in enumerate(per_boundary):
                head = factory(channels_of(shape), num_classes)
                if not isinstance(head, nn.Module):
                    raise XrossError(f"the exit head factory returned {type(head).__name__}, not an nn.Module")
                heads[head_key(net, b)] = head
        return cls(heads, len(shapes), len(shapes[0]) if shapes else 0)

    def head(self, net: int, boundary: int) -> nn.Module:
        return self.heads[head_key(net, boundary)]

    def logits(self, prefix: Prefix, value: Any) -> torch.Tensor:
        """The exit after ``prefix`` (its last net's head at boundary ``len(prefix) - 1``) on the value there."""
        x = feature(value)
        try:
            return self.head(prefix[-1], len(prefix) - 1)(x)
        except RuntimeError as e:
            raise ValueError(f"exit head {head_key(prefix[-1], len(prefix) - 1)} cannot read {tuple(x.shape)}") from e

    def parameters_of(self, net: int) -> list[nn.Parameter]:
        """The parameters of net ``net``'s heads (they learn with that net)."""
        return [p for b in range(self.num_boundaries) for p in self.head(net, b).parameters()]


def exit_prefixes(paths: Sequence[tuple[int, ...]], num_parts: int) -> list[Prefix]:
    """The distinct prefixes with an exit (before the last part) along ``paths``, in order of appearance."""
    return list(dict.fromkeys(p[: b + 1] for p in paths for b in range(num_parts - 1)))


def exit_loss(
    heads: ExitHeads,
    values: Mapping[Prefix, Any],
    prefixes: Sequence[Prefix],
    labels: torch.Tensor,
    weights: Sequence[float],
    label_smoothing: float = 0.0,
) -> dict[int, torch.Tensor]:
    """Each net's exit term: sum over the ``prefixes`` that end in it of ``weights[b] * CE(exit, labels)``.

    A prefix ending in net ``j`` trains ``j``'s head (and, through it, ``j``'s parts): on a stitched
    prefix the head learns to read what arrives at net ``j`` from other nets.
    """
    out: dict[int, torch.Tensor] = {}
    for prefix in prefixes:
        logits = heads.logits(prefix, values[prefix])
        term = weights[len(prefix) - 1] * hard_label_ce(logits.float(), labels, label_smoothing)
        out[prefix[-1]] = out[prefix[-1]] + term if prefix[-1] in out else term
    return out
