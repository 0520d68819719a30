"""Channel rules for ops that move or reshape dims: flatten, reshape/view, permute, transpose, unsqueeze, indexing.

The channels follow their dim to its new position; a flatten or a reshape that merges
the dims after them spreads each channel over several positions (``Segment.inner``); a
reshape that splits the channel dim into equal parts couples the parts, so a channel
shuffle (``view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)``) leaves each
part's channels interleaved with the others' (``inner`` = g). Slicing the channels is
:mod:`~surgery.channels.rules.slicing`'s. Padding or rolling other dims and reading a
tensor's size are harmless.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgery.channels.groups import Endpoint, Layout, Segment
from surgery.channels.registry import (
    _FUNCTION_RULES,
    _LITERAL_EDITS,
    _METHOD_RULES,
    _MODULE_RULES,
    _register,
    register_rule,
)
from surgery.channels.rules.arguments import _arg, _dims_arg, _node, _norm, _shape_of
from surgery.channels.rules.slicing import _slice_channels
from surgery.channels.walk import _fallback, _Walk
from surgery.graph.ops import targets


def _flatten_dims(w: _Walk, node: fx.Node, start: int, end: int) -> Layout | None:
    x = node.args[0]
    layout = w.layout(x)
    shape = w.shape(x)
    if layout is None or shape is None:
        return layout
    start, end = _norm(start, len(shape)), _norm(end, len(shape))
    if layout.dim < start:
        return layout
    if layout.dim > end:
        return layout.at(layout.dim - (end - start))
    if layout.dim != start:
        w.block([layout], f"{w.describe(node)} merges these channels into a preceding dim")
        return None
    inner = math.prod(shape[start + 1 : end + 1])
    return Layout(start, tuple(Segment(s.group, s.channels, s.inner * inner) for s in layout.segments))


@_register(_MODULE_RULES, [nn.Flatten])
def _flatten_module(w: _Walk, node: fx.Node, module: nn.Flatten) -> Layout | None:
    return _flatten_dims(w, node, module.start_dim, module.end_dim)


@register_rule(*targets("flatten"))
def _flatten(w: _Walk, node: fx.Node) -> Layout | None:
    return _flatten_dims(w, node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))


def _moved(w: _Walk, node: fx.Node, where: Callable[[int, int], int]) -> Layout | None:
    """Dim-moving ops: the channels go to ``where(old_dim, ndim)``."""
    layout = w.layout(node.args[0])
    return None if layout is None else layout.at(where(layout.dim, len(_shape_of(w, node.args[0]))))


@register_rule(*targets("permute"))
def _permute(w: _Walk, node: fx.Node) -> Layout | None:
    return _moved(w, node, lambda dim, ndim: [_norm(d, ndim) for d in _dims_arg(node, 1)].index(dim))


@register_rule(*targets("transpose", "swapaxes", "swapdims"))
def _transpose(w: _Walk, node: fx.Node) -> Layout | None:
    def swapped(dim: int, ndim: int) -> int:
        a, b = _norm(cast(int, node.args[1]), ndim), _norm(cast(int, node.args[2]), ndim)
        return {a: b, b: a}.get(dim, dim)

    return _moved(w, node, swapped)


@register_rule(*targets("unsqueeze"))
def _unsqueeze(w: _Walk, node: fx.Node) -> Layout | None:
    layout = w.layout(node.args[0])
    if layout is None:
        return None
    d = _norm(_arg(node, 1, "dim"), len(_shape_of(w, node)))
    return layout.at(layout.dim + (1 if d <= layout.dim else 0))


@register_rule(*targets("reshape", "view"))
def _reshape(w: _Walk, node: fx.Node) -> Layout | None:
    """Reshapes keep the channels when the dims before them keep their product and the channel dim survives.

    The channel dim may also lead a merge (each channel then spans several positions), or be
    split into several dims (see :func:`_split_channel_dim`).
    """
    x = node.args[0]
    layout = w.layout(x)
    if layout is None:
        return None
    before, after = _shape_of(w, x), _shape_of(w, node)
    lead = math.prod(before[: layout.dim])
    trail = math.prod(before[layout.dim + 1 :])
    for d in range(len(after)):
        if math.prod(after[:d]) != lead:
            continue
        if after[d] == before[layout.dim] and math.prod(after[d + 1 :]) == trail:
            _literal_channel_count(w, node, layout, d)
            return layout.at(d)
        merged = [e for e in range(layout.dim + 2, len(before) + 1) if math.prod(before[layout.dim : e]) == after[d]]
        if merged:
            _literal_channel_count(w, node, layout, d)
            inner = math.prod(before[layout.dim + 1 : merged[0]])
            return Layout(d, tuple(Segment(s.group, s.channels, s.inner * inner) for s in layout.segments))
        last = next((e for e in range(d + 1, len(after)) if math.prod(after[d : e + 1]) == before[layout.dim]), None)
        if last is not None and math.prod(after[last + 1 :]) == trail:
            return _split_channel_dim(w, node, layout, d, last)
    w.block([layout], f"{w.describe(node)} splits these channels or merges them into a preceding dim")
    return None


def _split_channel_dim(w: _Walk, node: fx.Node, layout: Layout, first: int, last: int) -> Layout | None:
    """A reshape that splits the channel dim into dims ``first..last`` (a shuffle's ``view(b, g, c // g, h, w)``).

    The channels go to dim ``last``; the dims before it index equal parts of the old channel
    dim, which are coupled position by position (each part changes as the others do), so
    the channels of any later transpose and merge (the rest of a shuffle) keep their
    function under a permutation or replication of the coupled parts.
    """
    after = _shape_of(w, node)
    parts, per = math.prod(after[first:last]), after[last]
    selected = [w.select(layout, k * per, (k + 1) * per, node) for k in range(parts)]
    pieces = [p for p in selected if p is not None]
    reason = f"{w.describe(node)} splits these channels into {parts} parts laid out differently"
    if len(pieces) < len(selected):
        w.block([layout], reason)
        return None
    if not w.couple(pieces, node, "splits", reason):
        return None
    _literal_channel_count(w, node, layout, last)
    return Layout(last, w.expand(pieces[0]).segments)


def _literal_channel_count(w: _Walk, node: fx.Node, layout: Layout, d: int) -> None:
    """A reshape that spells the channel count as a number: rewritten when the width changes where it is the
    count of one plain group kept as it is (``view(-1, 768)``), a reason not to replicate otherwise."""
    sizes = _dims_arg(node, 1)
    if d >= len(sizes) or not isinstance(sizes[d], int) or sizes[d] == -1:
        return
    plain = len(layout.segments) == 1 and layout.segments[0].inner == 1 and sizes[d] == layout.size
    if plain:
        w.add(layout, "literals", Endpoint(node.name, node.name, "reshape", _node(node.args[0]).name, dim=d))
    else:
        w.block([layout], f"{w.describe(node)} reshapes to a fixed count of {sizes[d]} channels", fixed_width=True)


def _rewrite_reshape(node: fx.Node, ep: Endpoint, moved: Callable[[int], int], size: int) -> None:
    """The size of output dim ``ep.dim`` (the channels) becomes the new width."""
    sizes = list(_dims_arg(node, 1))
    sizes[ep.dim] = moved(size)
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    node.args = (node.args[0], sizes) if packed else (node.args[0], *sizes)


_LITERAL_EDITS.register("reshape", _rewrite_reshape)


@_register(_FUNCTION_RULES, [F.pad])
def _pad(w: _Walk, node: fx.Node) -> Layout | None:
    """Padding other dims than the channels' (``Conv2dSame``, Swin's windows) keeps the channels."""
    layout = w.layout(node.args[0])
    pad = _arg(node, 1, "pad")
    if layout is None:
        return None
    from_last = len(_shape_of(w, node.args[0])) - 1 - layout.dim  # pad[2k], pad[2k + 1] pad the k-th dim from the last
    if not isinstance(pad, (list, tuple)) or list(pad[2 * from_last : 2 * from_last + 2]) not in ([], [0, 0]):
        w.block([layout], f"{w.describe(node)} pads the dim that carries these channels")
        return None
    return layout


@_register(_FUNCTION_RULES, [torch.roll])
@_register(_METHOD_RULES, ["roll"])
def _roll(w: _Walk, node: fx.Node) -> Layout | None:
    """Rolling other dims (Swin's shifted windows) keeps the channels; rolling theirs (or all) blocks them."""
    layout = w.layout(node.args[0])
    dims = _arg(node, 2, "dims")
    if layout is None:
        return None
    ndim = len(_shape_of(w, node.args[0]))
    rolled = [_norm(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])] if dims is not None else []
    if not rolled or layout.dim in rolled:
        w.block([layout], f"{w.describe(node)} rolls these channels")
        return None
    return layout


@register_rule(*targets("getitem"))
def _getitem(w: _Walk, node: fx.Node) -> Layout | None:
    """Basic indexing of a tensor (``x[:, 0]``, ``x[:, :n]``), or one element of a tuple-valued node (a split)."""
    x, index = node.args
    if x in w.tuples:
        if isinstance(index, int):
            return w.element(x, index)
        _fallback(w, node)
        return None
    layout = w.layout(x)
    if layout is None:
        return None
    ndim = len(_shape_of(w, x))
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
        _fallback(w, node)
        return None
    positions = list(range(len(items)))  # where each item sits in the index as written
    if Ellipsis in items:
        k = items.index(Ellipsis)
        used = sum(i is not None for i in items) - 1
        items[k : k + 1] = [slice(None)] * (ndim - used)
        positions[k : k + 1] = [k] * (ndim - used)
    src = out = 0
    rest = ndim - sum(i is not None for i in items)
    for item, position in zip(items + [slice(None)] * rest, positions + [-1] * rest):
        if item is None:
            out += 1
            continue
        if src == layout.dim:
            if item == slice(None):
                return layout.at(out)
            if isinstance(item, slice) and position >= 0:
                kept = _slice_channels(w, node, layout, item, position)
                return None if kept is None else kept.at(out)
            w.block([layout], f"{w.describe(node)} selects some of these channels")
            return None
        src += 1
        out += 0 if isinstance(item, int) else 1
    return None


@_register(_FUNCTION_RULES, [getattr])
@_register(_METHOD_RULES, ["size", "dim"])
def _size_read(w: _Walk, node: fx.Node) -> None:
    """Reading a tensor's shape, dtype or device is harmless."""
    attribute = node.args[1] if node.op == "call_function" and len(node.args) > 1 else "shape"
    if attribute not in ("shape", "dtype", "device", "ndim"):
        _fallback(w, node)
    return None


def _patch_merging(w: _Walk, node: fx.Node) -> Layout | None:
    """torchvision's Swin ``_patch_merging_pad(x)``: the four 2x2 neighbours of channels-last ``x``
    concatenated on the channels, so the output holds the input's channels four times over."""
    layout, shape = w.layout(node.args[0]), w.shape(node.args[0])
    if layout is None or shape is None or layout.dim != len(shape) - 1:
        _fallback(w, node)
        return None
    return Layout(layout.dim, layout.segments * 4)


try:  # torchvision is a dependency, but its private Swin helper may move
    from torchvision.models.swin_transformer import _patch_merging_pad
except ImportError:  # pragma: no cover
    _patch_merging_pad = None
if _patch_merging_pad is not None:
    _register(_FUNCTION_RULES, [_patch_merging_pad])(_patch_merging)
