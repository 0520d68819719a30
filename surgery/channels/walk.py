"""The union-find pass of the channel analysis: one forward walk over the graph assigning layouts.

:class:`_Walk` gives every node's output a :class:`~surgery.channels.groups.Layout`,
dispatching each call to the rule registered for its module class, function or method
name (:mod:`surgery.channels.registry`), and merges coupled channel groups in a
union-find; an op without a rule blocks the channels it touches (:func:`_fallback`).
A node whose output is a tuple of tensors (``torch.split``) gets one layout per element.

Groups can also *split*: when an op takes part of a group's channels (a slice, a
split, an addition of a tensor whose groups are cut elsewhere), the group is replaced by
consecutive pieces, each a new group with all the endpoints and reasons of the whole
(:meth:`_Walk.split`). Layouts recorded earlier name the old group; reading them through
:meth:`_Walk.layout` (or :meth:`_Walk.expand`) always gives the pieces.
The rules themselves live in :mod:`surgery.channels.rules`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import fx

from surgery.channels.groups import GROUP_LISTS, ChannelGroup, Endpoint, Layout, Segment
from surgery.channels.registry import FUNCTION_RULES, METHOD_RULES, MODULE_RULES
from surgery.channels.shapes import Shapes, describe_node


class _Walk:
    """One forward pass over the graph assigning layouts; groups merge in a union-find."""

    def __init__(self, gm: fx.GraphModule, shapes: Shapes):
        self.gm = gm
        self.shapes = shapes
        self.modules = dict(gm.named_modules())
        self.layouts: dict[fx.Node, Layout] = {}
        self.tuples: dict[fx.Node, tuple[Layout | None, ...]] = {}  # nodes whose output is a tuple of tensors
        self.parent: list[int] = []
        self.drafts: list[ChannelGroup] = []  # per group id; merged into the root's by union
        self.pieces: dict[int, tuple[tuple[int, int], ...]] = {}  # split root -> its (piece group, channels)
        self.calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls[str(n.target)] = self.calls.get(str(n.target), 0) + 1

    # groups
    def new_group(self, channels: int, blocks: int = 1) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.drafts.append(ChannelGroup(gid, channels, blocks))
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def draft(self, g: int) -> ChannelGroup:
        return self.drafts[self.find(g)]

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        da, db = self.drafts[ra], self.drafts[rb]
        da.blocks = math.lcm(da.blocks, db.blocks)
        da.multiple = math.lcm(da.multiple, db.multiple)
        for name in GROUP_LISTS:
            getattr(da, name).extend(getattr(db, name))

    def block(
        self, layouts: Iterable[Layout | None], reason: str, replication_only: bool = False, fixed_width: bool = False
    ) -> None:
        """Record why the channels of ``layouts`` cannot move (default), cannot change in number
        (``fixed_width``) or cannot be copied exactly (``replication_only``)."""
        kind = "width_blockers" if fixed_width else "replication_blockers" if replication_only else "blockers"
        for layout in layouts:
            for g in self.expand(layout).groups() if layout is not None else ():
                getattr(self.draft(g), kind).append(reason)

    def require_uniform(self, layout: Layout, reason: str) -> None:
        """A replication of ``layout``'s channels must copy each the same number of times (statistics over them)."""
        if len(layout.segments) != 1 or layout.segments[0].inner != 1:
            self.block([layout], f"{reason}, across several channel groups", replication_only=True)
            return
        self.draft(self.expand(layout).segments[0].group).uniform.append(reason)

    def couple(self, layouts: list[Layout], node: fx.Node, verb: str, reason: str | None = None) -> bool:
        """Join the groups of ``layouts`` position by position (they hold the same channels); False if they cannot.

        Groups are split first where one layout has a segment boundary another has not. The
        channels are blocked when they cannot be joined, for ``reason`` (default: ``node`` *verb*
        channels laid out differently).
        """
        refined = self.refine(layouts, node)
        structure = [(s.channels, s.inner) for s in refined[0].segments] if refined else None
        if refined is None or any([(s.channels, s.inner) for s in other.segments] != structure for other in refined):
            self.block(layouts, reason or f"{self.describe(node)} {verb} channels laid out differently")
            return False
        for other in refined[1:]:
            for a, b in zip(refined[0].segments, other.segments):
                self.union(a.group, b.group)
        return True

    def add(self, layout: Layout, role: str, endpoint: Endpoint) -> None:
        for g in self.expand(layout).groups():
            getattr(self.draft(g), role).append(endpoint)

    # splitting groups
    def expand(self, layout: Layout) -> Layout:
        """``layout`` with every split group replaced by its pieces (segments name live groups)."""
        if not self.pieces:
            return layout
        segments = tuple(piece for s in layout.segments for piece in self._live(s))
        return layout if segments == layout.segments else Layout(layout.dim, segments)

    def _live(self, s: Segment) -> list[Segment]:
        root = self.find(s.group)
        parts = self.pieces.get(root)
        if parts is None:
            return [s if s.group == root else Segment(root, s.channels, s.inner)]
        return [piece for g, c in parts for piece in self._live(Segment(g, c, s.inner))]

    def split(self, group: int, offsets: Sequence[int], node: fx.Node) -> None:
        """Split ``group`` at channel ``offsets`` (0 < offset < channels) into consecutive pieces.

        Each piece is a new group with every endpoint and reason of the whole. Grouped convs
        that read the group keep their blocks when the cuts fall between blocks; widening one
        piece would still unbalance them, so that is refused for every piece.
        """
        root = self.find(group)
        whole = self.drafts[root]
        bounds = [0, *sorted(set(offsets)), whole.channels]
        block = whole.channels // whole.blocks if whole.channels % whole.blocks == 0 else 0
        aligned = block > 0 and all(b % block == 0 for b in bounds)
        parts = []
        for start, stop in itertools.pairwise(bounds):
            piece = self.new_group(stop - start, (stop - start) // block if aligned else 1)
            for name in GROUP_LISTS:
                getattr(self.drafts[piece], name).extend(getattr(whole, name))
            if whole.blocks > 1 and aligned:
                self.drafts[piece].width_blockers.append(
                    f"grouped convs read these channels in blocks of {block} together with other channels that "
                    f"{self.describe(node)} separates from them: widening only these would unbalance the blocks"
                )
            elif whole.blocks > 1:
                self.drafts[piece].blockers.append(
                    f"{self.describe(node)} splits channels that grouped convs read in blocks of "
                    f"{whole.channels // whole.blocks} across a block"
                )
            parts.append((piece, stop - start))
        self.pieces[root] = tuple(parts)

    def cut(self, layout: Layout, positions: Iterable[int], node: fx.Node) -> Layout | None:
        """``layout`` split so that a segment boundary falls at each of ``positions`` (None: one cuts a channel)."""
        positions = sorted(set(positions))
        while True:
            layout = self.expand(layout)
            start = 0
            for s in layout.segments:
                inside = [p - start for p in positions if start < p < start + s.size]
                if inside:
                    if any(p % s.inner for p in inside):
                        return None
                    self.split(s.group, [p // s.inner for p in inside], node)
                    break
                start += s.size
            else:
                return layout

    def refine(self, layouts: list[Layout], node: fx.Node) -> list[Layout] | None:
        """``layouts`` (of one size) split until they all have the same segment boundaries; None if impossible."""
        if len({lay.size for lay in layouts}) != 1:
            return None
        while True:
            layouts = [self.expand(lay) for lay in layouts]
            cuts = {p for lay in layouts for p in itertools.accumulate(s.size for s in lay.segments)}
            refined = [r for lay in layouts if (r := self.cut(lay, cuts, node)) is not None]
            if len(refined) < len(layouts):
                return None
            if all(lay == self.expand(r) for lay, r in zip(layouts, refined)):
                return layouts
            layouts = refined

    def select(self, layout: Layout, start: int, stop: int, node: fx.Node) -> Layout | None:
        """The segments of ``layout`` at positions ``start:stop`` of its dim (splitting groups at the bounds).

        None if a bound falls inside the positions of one channel (a flattened channel cut in two).
        """
        cut = self.cut(layout, (start, stop), node)
        if cut is None or start >= stop:
            return None
        kept, position = [], 0
        for s in cut.segments:
            if start <= position and position + s.size <= stop:
                kept.append(s)
            position += s.size
        return Layout(cut.dim, tuple(kept))

    def require_multiple(self, layout: Layout, n: int, reason: str) -> None:
        """A new size of ``layout``'s channels must be a multiple of ``n`` (heads sharing them); copies of
        them would change the output (``reason``)."""
        layout = self.expand(layout)
        self.block([layout], reason, replication_only=True)
        if len(layout.segments) != 1 or layout.segments[0].inner != 1:
            self.block([layout], f"{reason}, across several channel groups", fixed_width=True)
            return
        d = self.draft(layout.segments[0].group)
        d.multiple = math.lcm(d.multiple, n)

    def require_blocks(self, layout: Layout, blocks: int, node: fx.Node, what: str) -> None:
        """``node`` reads ``layout`` in ``blocks`` equal contiguous blocks (a grouped conv, a group norm).

        A group covering whole blocks keeps its channels in their blocks (``ChannelGroup.blocks``);
        a group inside one block can be permuted freely; one that straddles a boundary is blocked.
        When the layout holds several groups, widening one of them would unbalance the blocks.
        """
        layout = self.expand(layout)
        if blocks <= 1:
            return
        span = layout.size // blocks
        start = 0
        for s in layout.segments:
            if start % span == 0 and s.size % span == 0 and span % s.inner == 0:
                d = self.draft(s.group)
                d.blocks = math.lcm(d.blocks, s.size // span)
            elif start // span != (start + s.size - 1) // span:
                self.block([Layout(layout.dim, (s,))], f"{what} {self.describe(node)} reads a concatenation")
            start += s.size
        if len(layout.segments) > 1:
            self.block(
                [layout],
                f"{what} {self.describe(node)} reads these channels in {blocks} blocks together with other channels: "
                "widening only some of them would unbalance the blocks",
                fixed_width=True,
            )

    # node helpers
    def layout(self, arg: Any) -> Layout | None:
        """The layout of a node's output (None for an untracked or tuple-valued node)."""
        layout = self.layouts.get(arg) if isinstance(arg, fx.Node) else None
        return None if layout is None else self.expand(layout)

    def element(self, arg: Any, index: int) -> Layout | None:
        """The layout of element ``index`` of a tuple-valued node's output."""
        items = self.tuples.get(arg, ())
        layout = items[index] if -len(items) <= index < len(items) else None
        return None if layout is None else self.expand(layout)

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        return self.shapes.of.get(arg.name) if isinstance(arg, fx.Node) else None

    def describe(self, node: fx.Node) -> str:
        return describe_node(self.gm, node)

    def tracked_inputs(self, node: fx.Node) -> list[Layout]:
        """The layouts of every tracked argument of ``node`` (each element of a tuple-valued one)."""
        found: list[Layout] = []

        def visit(a: fx.Node) -> fx.Node:
            found.extend(self.expand(lay) for lay in (self.layouts.get(a), *self.tuples.get(a, ())) if lay is not None)
            return a

        fx.node.map_arg((node.args, node.kwargs), visit)
        return found

    def not_followed(self, node: fx.Node) -> None:
        self.block(
            self.tracked_inputs(node),
            f"{self.describe(node)} does something to them the channel analysis does not follow",
        )

    # the pass
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            out = self.visit(node)
            if isinstance(out, tuple):
                self.tuples[node] = out
            elif out is not None:
                self.layouts[node] = out
                for g in self.expand(out).groups():
                    self.draft(g).nodes.append(node.name)
            if (
                node.op == "call_module"
                and self.calls[str(node.target)] > 1
                and any(True for _ in self.modules[str(node.target)].parameters())
            ):
                self.block(
                    [*(out if isinstance(out, tuple) else [out]), *self.tracked_inputs(node)],
                    f"{self.describe(node)} is called {self.calls[str(node.target)]} times with shared weights",
                )

    def visit(self, node: fx.Node) -> Layout | tuple[Layout | None, ...] | None:
        if node.op == "placeholder":
            shape = self.shape(node)
            if shape is None or len(shape) < 2:
                return None
            layout = Layout(1, (Segment(self.new_group(shape[1]), shape[1]),))
            self.block([layout], f"they come from the model input (node '{node.name}')")
            return layout
        if node.op == "output":
            self.block(self.tracked_inputs(node), f"reaches the model output (node '{node.name}')")
            return None
        if node.op == "get_attr":
            return None
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            rule = MODULE_RULES.for_class(type(module))
            if rule is None:
                _fallback(self, node)
                return None
            return rule(self, node, module)
        found = METHOD_RULES.find(str(node.target)) if node.op == "call_method" else FUNCTION_RULES.find(node.target)
        if found is None:
            _fallback(self, node)
            return None
        return found(self, node)

    def finish(self) -> dict[int, ChannelGroup]:
        """The live root groups, their lists in graph order without repeats, and their reasons without repeats."""
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        groups = {g: self.drafts[g] for g in range(len(self.parent)) if self.find(g) == g and g not in self.pieces}
        for grp in groups.values():
            for endpoints in (grp.producers, grp.followers, grp.consumers, grp.literals):
                endpoints[:] = sorted(dict.fromkeys(endpoints), key=lambda ep: order[ep.node])
            grp.nodes[:] = sorted(dict.fromkeys(grp.nodes), key=order.__getitem__)
            grp.blockers[:] = dict.fromkeys(grp.blockers)
            grp.replication_blockers[:] = dict.fromkeys(grp.replication_blockers)
            grp.width_blockers[:] = dict.fromkeys(grp.width_blockers)
            if grp.channels % grp.blocks:
                grp.blockers.append(
                    f"{grp.channels} channels cannot split into the {grp.blocks} blocks "
                    "of the grouped convs reading them"
                )
        return groups

    def rooted(self, layout: Layout) -> Layout:
        """``layout`` in terms of the final groups: split groups expanded, every segment at its root."""
        layout = self.expand(layout)
        return Layout(layout.dim, tuple(Segment(self.find(s.group), s.channels, s.inner) for s in layout.segments))


def _fallback(w: _Walk, node: fx.Node) -> None:
    """The rule of an op no rule covers: the channels it touches are blocked."""
    w.not_followed(node)
    return None
