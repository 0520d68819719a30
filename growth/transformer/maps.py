"""How each dimension of a transformer grows: which old entry every new entry copies, and how readers compensate.

An :class:`AxisMap` says, for every entry of a grown axis, the old entry it copies
(``-1`` for an entry added as padding) and how many new entries copy that one. A layer
*writing* along the axis copies its rows (padding gets the rows' mean, or zeros); a layer
*reading* along it divides the copied columns by their count (padding gets zero columns),
so the sum it computes is unchanged.

* Free units (the MLP, BERT's pooler): every old unit is kept, whole multiples are copied
  again, the rest are drawn without replacement (seeded).
* Heads: whole heads are copied (query, key and value alike), the head size is fixed;
  with grouped-query attention either each group gains query heads (same key-value
  heads) or whole groups are copied, so a query head always reads the copy of its own
  key-value head.
* The residual stream under a norm: an integer factor copies every channel the same
  number of times (a norm's mean and variance are unchanged); any other width pads the
  stream with its mean (LayerNorm) or with zeros (RMSNorm), which scales the variance by
  ``old/new`` exactly; the norms then take ``eps * old/new`` and gains ``* sqrt(old/new)``
  (LEMON's observation), so the function is unchanged for any width.

>>> import torch
>>> from growth.transformer.maps import free_units, stream
>>> m = free_units(4, 6, torch.Generator().manual_seed(0))
>>> m.index.tolist(), m.count.tolist()  # units 0 and 1 copied: each of the two copies carries half
([0, 1, 2, 3, 0, 1], [2.0, 2.0, 1.0, 1.0, 2.0, 2.0])
>>> stream(4, 8, "layer").index.tolist(), stream(4, 6, "rms").index.tolist()
([0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, -1, -1])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from growth.errors import GrowthError

PAD = -1


@dataclass(frozen=True)
class AxisMap:
    """New entry j copies old entry ``index[j]`` (``-1``: padding); ``count[j]`` entries copy the same one."""

    index: torch.Tensor
    count: torch.Tensor
    old: int
    pad: str = "zero"  # what a writer puts in padding: "zero" or "mean" (of the old entries)

    @property
    def new(self) -> int:
        return int(self.index.numel())

    @property
    def padded(self) -> bool:
        return bool((self.index == PAD).any())

    @property
    def changes(self) -> bool:
        return self.new != self.old or not torch.equal(self.index, torch.arange(self.old))

    def read(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        """The tensor of a layer reading along ``axis``: copied columns divided by their count, padding zero."""
        out = self._take(tensor, axis) / self._along(self.count.to(tensor.dtype), tensor, axis)
        return out * self._along(self.index != PAD, tensor, axis)

    def write(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        """The tensor of a layer writing along ``axis``: copied rows, padding the rows' mean or zero."""
        out = self._take(tensor, axis)
        if self.padded:
            keep = self._along(self.index != PAD, tensor, axis)
            fill = tensor.mean(axis, keepdim=True) if self.pad == "mean" else torch.zeros_like(out)
            out = torch.where(keep, out, fill.expand_as(out))
        return out

    def _take(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        return tensor.index_select(axis, self.index.clamp(min=0).to(tensor.device))

    @staticmethod
    def _along(values: torch.Tensor, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * tensor.dim()
        shape[axis] = -1
        return values.to(tensor.device).view(shape)


def _counted(index: torch.Tensor, old: int, pad: str = "zero") -> AxisMap:
    kept = index[index != PAD]
    counts = torch.bincount(kept, minlength=old).double()
    count = torch.where(index == PAD, torch.ones(()).double(), counts[index.clamp(min=0)])
    return AxisMap(index, count, old, pad)


def identity(size: int) -> AxisMap:
    return _counted(torch.arange(size), size)


def free_units(old: int, new: int, generator: torch.Generator) -> AxisMap:
    """Every old unit, then whole copies of them, then ``new % old`` of them drawn without replacement."""
    if new < old:
        raise GrowthError(f"cannot grow {old} units to {new}; give a larger size")
    rest = torch.randperm(old, generator=generator)[: new % old].sort().values
    return _counted(torch.cat([torch.arange(old).repeat(new // old), rest]), old)


def stream(old: int, new: int, norm: str) -> AxisMap:
    """The residual stream: copied whole ``new/old`` times when that is an integer, else padded (see the module)."""
    if new < old:
        raise GrowthError(f"cannot grow a hidden size of {old} to {new}; give a larger size")
    if new % old == 0:
        return _counted(torch.arange(old).repeat(new // old), old)
    index = torch.cat([torch.arange(old), torch.full((new - old,), PAD)])
    return _counted(index, old, pad="mean" if norm == "layer" else "zero")


def in_blocks(units: AxisMap, size: int) -> AxisMap:
    """A map of whole units (heads) spread over their ``size`` entries each (head size)."""
    inner = torch.arange(size)
    index = (units.index[:, None] * size + inner).flatten()
    count = units.count[:, None].expand(-1, size).flatten()
    return AxisMap(index, count, units.old * size, units.pad)


def concat(*maps: AxisMap) -> AxisMap:
    """Maps of consecutive segments of one axis (GPT-2's ``c_attn`` holds query, key and value)."""
    offsets = [sum(m.old for m in maps[:k]) for k in range(len(maps))]
    index = torch.cat([m.index + offset for m, offset in zip(maps, offsets)])
    return AxisMap(index, torch.cat([m.count for m in maps]), sum(m.old for m in maps), maps[0].pad)


def heads(
    heads: int, kv_heads: int, new_heads: int, new_kv_heads: int, generator: torch.Generator
) -> tuple[AxisMap, AxisMap]:
    """Maps of the query heads and of the key-value heads (whole heads), keeping every query head on its group."""
    group, new_group = heads // kv_heads, new_heads // max(new_kv_heads, 1)
    if new_heads < heads or new_kv_heads < kv_heads:
        raise GrowthError(f"cannot grow {heads} heads ({kv_heads} key-value) to {new_heads} ({new_kv_heads})")
    if new_heads % new_kv_heads:
        raise GrowthError(
            f"{new_heads} query heads do not split into {new_kv_heads} key-value groups; "
            "give a multiple of the key-value heads"
        )
    if new_kv_heads == kv_heads:  # every group gains query heads
        per = [free_units(group, new_group, generator).index + g * group for g in range(kv_heads)]
        return _counted(torch.cat(per), heads), identity(kv_heads)
    if new_group != group:
        raise GrowthError(
            f"grouped-query attention grows either the query heads of each group ({kv_heads} key-value heads kept) "
            f"or whole groups of {group} query heads; {new_heads} query / {new_kv_heads} key-value heads is neither"
        )
    groups = free_units(kv_heads, new_kv_heads, generator)
    query = (groups.index[:, None] * group + torch.arange(group)).flatten()
    return _counted(query, heads), groups
