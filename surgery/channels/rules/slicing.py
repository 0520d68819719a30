"""Channel rules for taking part of the channels: slices ``x[:, a:b]``, ``torch.split`` and ``torch.chunk``.

A slice or a piece of a split holds the segments of its input at the positions it
selects; where a bound falls inside a group, the group is split there (each piece its
own group: the input's producers then write several groups, and widening one piece
widens only its part of them). The bounds and sizes are written in the graph, so each
such node is a *literal* of the groups of its input: when their widths change,
:func:`surgery.channels.remap.remap_channels` rewrites it (:func:`_rewrite_slice`,
:func:`_rewrite_split`) so that it still selects the same channels, which keeps a
widening exact (GhostNet's ``cat([x1, x2])[:, :out_chs]``, MixNet's mixed convs, CSP's
``split``). Splits along another dim keep the channels whole in every piece; a strided
slice of the channels, or one that cuts a flattened channel, blocks them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import fx

from surgery.channels.groups import Endpoint, Layout
from surgery.channels.registry import _LITERAL_EDITS, register_rule
from surgery.channels.rules.arguments import _arg, _node, _norm
from surgery.channels.walk import _fallback, _Walk
from surgery.graph.ops import targets


def _slice_channels(w: _Walk, node: fx.Node, layout: Layout, item: slice, position: int) -> Layout | None:
    """The channels ``item`` (at ``position`` of the index) keeps of ``layout``; blocked and None if it cannot say."""
    bounds = (item.start, item.stop, item.step)
    if any(b is not None and not isinstance(b, int) for b in bounds):
        w.block([layout], f"{w.describe(node)} slices these channels at a computed position")
        return None
    start, stop, step = item.indices(layout.size)
    if step != 1 or start >= stop:
        what = f"takes every {step}th of these channels" if step != 1 else "selects none of these channels"
        w.block([layout], f"{w.describe(node)} {what}")
        return None
    out = w.select(layout, start, stop, node)
    if out is None:
        w.block([layout], f"{w.describe(node)} selects some of these channels (a bound cuts a flattened channel)")
        return None
    if item.start is not None or item.stop is not None:
        w.add(layout, "literals", Endpoint(node.name, node.name, "slice", _node(node.args[0]).name, dim=position))
    return out


def _rewrite_slice(node: fx.Node, ep: Endpoint, moved: Callable[[int], int], size: int) -> None:
    """The slice at index position ``ep.dim`` selects the same channels at their new positions."""
    x, index = node.args
    items = list(index) if isinstance(index, tuple) else [index]
    item = items[ep.dim]
    assert isinstance(item, slice), "a slice literal is recorded only for a slice of the channels"

    def bound(b: int | None) -> int | None:
        return None if b is None else moved(max(0, b + size) if b < 0 else min(b, size))

    items[ep.dim] = slice(bound(item.start), bound(item.stop), item.step)
    node.args = (x, tuple(items) if isinstance(index, tuple) else items[0])


_LITERAL_EDITS.register("slice", _rewrite_slice)


def _sections(node: fx.Node, size: int) -> list[int] | None:
    """The piece sizes of a split or chunk of ``size`` positions (None when they are computed in the graph)."""
    chunk = node.target in ("chunk", torch.chunk)
    name = "chunks" if chunk else "split_size_or_sections" if node.op == "call_function" else "split_size"
    given = _arg(node, 1, name)
    if chunk and isinstance(given, int):
        given = math.ceil(size / given)
    if isinstance(given, int) and given > 0:
        return [given] * (size // given) + ([size % given] if size % given else [])
    if isinstance(given, (list, tuple)) and all(isinstance(s, int) for s in given) and sum(given) == size:
        return list(given)
    return None


@register_rule(*targets("split", "chunk"))
def _split(w: _Walk, node: fx.Node) -> tuple[Layout | None, ...] | None:
    """Split or chunk: one layout per piece; along the channel dim, each piece holds the segments it covers."""
    x = node.args[0]
    layout = w.layout(x)
    shape = w.shape(x)
    if layout is None or shape is None:
        return None
    dim = _norm(_arg(node, 2, "dim", 0), len(shape))
    sections = _sections(node, shape[dim])
    if sections is None:
        _fallback(w, node)
        return None
    if dim != layout.dim:
        return tuple(layout for _ in sections)
    bounds = [0, *itertools.accumulate(sections)]
    if w.cut(layout, bounds, node) is None:
        w.block([layout], f"{w.describe(node)} cuts a flattened channel in two")
        return None
    w.add(layout, "literals", Endpoint(node.name, node.name, "split", _node(x).name))
    return tuple(w.select(layout, a, b, node) for a, b in itertools.pairwise(bounds))


def _rewrite_split(node: fx.Node, ep: Endpoint, moved: Callable[[int], int], size: int) -> None:
    """The pieces keep their channels at their new sizes (a chunk becomes a split with explicit sizes)."""
    sections = _sections(node, size)
    assert sections is not None, "a split literal is recorded only for sizes written in the graph"
    old = list(itertools.accumulate(sections))
    new = [moved(b) for b in old]
    sizes = [b - a for a, b in zip([0, *new], new)]
    dim = _arg(node, 2, "dim", 0)
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args = (node.args[0], sizes)
    node.kwargs = {"dim": dim}


_LITERAL_EDITS.register("split", _rewrite_split)
