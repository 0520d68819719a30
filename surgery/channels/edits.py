"""The tensor edits a channel map makes, and the record of how one kind of layer takes them.

A :class:`ChannelMap` says, for each new channel position, which old channel it holds
(``-1``: a fresh channel). The helpers here apply one to a tensor: :func:`take` (rows
of producers and followers), :func:`read_columns` (a consumer's input columns, divided
by each old channel's count so the function is kept). A layer type's
:class:`WeightEdit` (registered with :func:`surgery.channels.register_edit`, next to its
channel rule) says what it does with a map on its output, its input, or both.

>>> import torch
>>> m = ChannelMap.permutation([2, 0, 1])
>>> take(torch.tensor([10.0, 11.0, 12.0]), 0, m)
tensor([12., 10., 11.])
>>> read_columns(torch.ones(1, 2), ChannelMap(torch.tensor([0, 0, 1]), 2), 1, 0.0, None)
tensor([[0.5000, 0.5000, 1.0000]])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery.channels.groups import Endpoint, Layout
from surgery.core.errors import SurgeryError


@dataclass(frozen=True)
class ChannelMap:
    """``index[j]`` is the old channel at new position ``j`` (``-1`` for a fresh channel) of ``old`` channels."""

    index: torch.Tensor
    old: int

    @classmethod
    def identity(cls, channels: int) -> ChannelMap:
        """The map that leaves ``channels`` channels where they are."""
        return cls(torch.arange(channels), channels)

    @classmethod
    def permutation(cls, perm: Sequence[int], blocks: int = 1) -> ChannelMap:
        """Position ``j`` takes old channel ``perm[j]``; with ``blocks`` > 1 channels must stay in their block."""
        index = torch.as_tensor(list(perm), dtype=torch.long)
        n = len(index)
        if n == 0 or not torch.equal(index.sort().values, torch.arange(n)):
            raise SurgeryError(
                f"perm must hold each of 0..{n - 1} exactly once; got {list(perm)[:8]}{'...' if n > 8 else ''}"
            )
        size = n // blocks
        if blocks > 1 and not torch.equal(index // size, torch.arange(n) // size):
            raise SurgeryError(
                f"grouped convs read these {n} channels in {blocks} blocks of {size}: perm must "
                "keep every channel in its block"
            )
        return cls(index, n)

    @property
    def size(self) -> int:
        """The number of new positions."""
        return len(self.index)

    @property
    def counts(self) -> torch.Tensor:
        """How many new positions hold each old channel."""
        return torch.bincount(self.index[self.index >= 0], minlength=self.old)

    def spread(self, inner: int) -> ChannelMap:
        """The same map over features when each channel spans ``inner`` consecutive positions."""
        if inner == 1:
            return self
        positions = (self.index[:, None] * inner + torch.arange(inner)).flatten()
        fresh = (self.index < 0).repeat_interleave(inner)
        return ChannelMap(torch.where(fresh, -1, positions), self.old * inner)


def layout_map(layout: Layout, maps: dict[int, ChannelMap]) -> ChannelMap | None:
    """The map of a whole tensor dim holding several groups (a concatenation, a flatten); None if unchanged."""
    if not any(s.group in maps for s in layout.segments):
        return None
    parts, offset = [], 0
    for s in layout.segments:
        m = maps.get(s.group, ChannelMap.identity(s.channels)).spread(s.inner)
        parts.append(torch.where(m.index < 0, -1, m.index + offset))
        offset += s.size
    return ChannelMap(torch.cat(parts), offset)


# ----------------------------------------------------------------------------- tensor edits


def take(t: torch.Tensor, dim: int, m: ChannelMap) -> torch.Tensor:
    """Slices of ``t`` along ``dim`` in map order; fresh positions get the mean slice."""
    out = t.index_select(dim, m.index.clamp(min=0))
    fresh = m.index < 0
    if fresh.any():
        shape = [1] * t.dim()
        shape[dim] = -1
        out = torch.where(fresh.view(shape), t.mean(dim, keepdim=True), out)
    return out


def read_columns(
    weight: torch.Tensor, m: ChannelMap, groups: int, noise: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Input columns of a (grouped) layer for map ``m``, divided by each old channel's count.

    ``noise`` > 0 adds Gaussian noise (``noise`` times the weights' std) to replicated
    columns, zero-sum over the copies of each channel, so the output stays the same.
    """
    out_ch, local, rest = weight.shape[0], weight.shape[1], weight.shape[2:]
    if m.old != local * groups or m.size % groups:
        raise SurgeryError(
            f"channel map {m.old}->{m.size} does not fit a layer with {local * groups} inputs in {groups} groups"
        )
    new_local = m.size // groups
    index = m.index.view(groups, new_local)
    fresh = index < 0
    local_index = index - (torch.arange(groups) * local)[:, None]
    if not bool((fresh | ((local_index >= 0) & (local_index < local))).all()):
        raise SurgeryError(f"channel map moves channels across the {groups} blocks of a grouped layer")
    counts = m.counts.to(weight.dtype).clamp(min=1)
    scale = torch.where(fresh, 0.0, 1.0 / counts[index.clamp(min=0)]).to(weight.dtype)
    trail = (1,) * len(rest)
    per_group = weight.reshape(groups, out_ch // groups, local, *rest)
    gather_index = (
        local_index.clamp(min=0).view(groups, 1, new_local, *trail).expand(groups, out_ch // groups, new_local, *rest)
    )
    if groups == 1:  # same result as the gather below, several times faster on large layers
        read = weight.index_select(1, local_index[0].clamp(min=0)).mul_(scale.view(1, new_local, *trail))[None]
    else:
        read = per_group.gather(2, gather_index) * scale.view(groups, 1, new_local, *trail)
    if noise > 0:
        e = torch.randn(read.shape, generator=generator, dtype=read.dtype) * (noise * float(weight.std()))
        e = torch.where(fresh.view(groups, 1, new_local, *trail), 0.0, e)
        sums = torch.zeros_like(per_group).scatter_add_(2, gather_index, e)
        copies = counts[index.clamp(min=0)].view(groups, 1, new_local, *trail)
        read = read + e - sums.gather(2, gather_index) / copies
    return read.reshape(out_ch, new_local, *rest)


def param_like(t: torch.Tensor | None, value: torch.Tensor) -> Any:
    """``value`` as what ``t`` was: a Parameter (same ``requires_grad``) or a plain tensor; None for None."""
    if t is None:
        return None
    return nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace ``module.<name>`` by ``value``, kept a Parameter or buffer as it was."""
    setattr(module, name, param_like(getattr(module, name), value))


def take_rows(module: nn.Module, m: ChannelMap, names: Sequence[str] = ("weight", "bias")) -> None:
    """Reorder (or replicate) dim 0 of each of ``module``'s tensors ``names`` that exists by ``m``."""
    for name in names:
        t = getattr(module, name, None)
        if t is not None:
            set_tensor(module, name, take(t.detach(), 0, m))


def head_index(old: int, new: int, heads: int) -> torch.Tensor:
    """Positions kept when ``heads`` heads sharing ``old`` channels shrink to ``new``: each head's first ones."""
    if new % heads or old % heads or new > old:
        raise SurgeryError(f"{new} of {old} channels do not split into {heads} attention heads")
    head, new_head = old // heads, new // heads
    return (torch.arange(new_head) + (torch.arange(heads) * head)[:, None]).flatten()


def qkv_index(old: int, new: int, heads: int) -> torch.Tensor:
    """:func:`head_index` in each of the query, key and value blocks of a packed projection."""
    inner = head_index(old, new, heads)
    return torch.cat([inner + b * old for b in range(3)])


@dataclass(frozen=True)
class WeightEdit:
    """How one kind of layer takes a new map on its output (``out``), input (``inp``) or both (``through``).

    ``out(layer, map)`` for a producer, ``inp(layer, map, noise, generator)`` for a consumer
    (see :func:`read_columns`), ``through(layer, map, endpoint)`` for a follower (BatchNorm, a
    depthwise conv); a role left None is refused for that layer in one line.
    """

    out: Callable[[Any, ChannelMap], None] | None = None
    inp: Callable[[Any, ChannelMap, float, torch.Generator | None], None] | None = None
    through: Callable[[Any, ChannelMap, Endpoint], None] | None = None
