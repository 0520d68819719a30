"""The results of the channel analysis: where channel groups sit in each tensor, and who touches them.

A :class:`Layout` places channel groups (each a :class:`Segment`) along one dim of a
node's output; an :class:`Endpoint` is a weight that writes, follows or reads a group (or a
constant of the graph that spells out how many of its channels there are); a
:class:`ChannelGroup` collects the endpoints of coupled channels and the reasons a change
would not be exact; a :class:`ChannelAnalysis` holds them all for one graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from surgery.channels.shapes import Shapes
from surgery.core.errors import SurgeryError
from surgery.graph.names import GraphIndex


@dataclass(frozen=True)
class Segment:
    """``channels`` channels of group ``group``, each spread over ``inner`` consecutive positions."""

    group: int
    channels: int
    inner: int = 1

    @property
    def size(self) -> int:
        return self.channels * self.inner


@dataclass(frozen=True)
class Layout:
    """Where channel groups sit along dimension ``dim`` of a node's output, in order."""

    dim: int
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def at(self, dim: int) -> Layout:
        return Layout(dim, self.segments)

    def groups(self) -> list[int]:
        return list(dict.fromkeys(s.group for s in self.segments))


@dataclass(frozen=True)
class Endpoint:
    """Weights that touch a group's channels.

    ``node`` applies them; ``target`` is the module path (or the parameter path for a
    ``get_attr``, or the node name for a *literal*: a slice bound or split size in the
    graph); ``space`` names the node whose output layout indexes them (the input of a
    consumer or a literal, the output otherwise); ``dim`` is the dim of a parameter tensor
    that carries the channels (for a literal: where in the node's arguments the count is);
    ``groups`` the conv groups of a consumer.
    """

    node: str
    target: str
    kind: str
    space: str
    dim: int = 0
    groups: int = 1


# The list fields of a ChannelGroup: merged when groups couple, copied when a group splits.
GROUP_LISTS = (
    "producers",
    "followers",
    "consumers",
    "literals",
    "nodes",
    "blockers",
    "replication_blockers",
    "width_blockers",
    "uniform",
)


@dataclass
class ChannelGroup:
    """Channels that must change together, with every weight that touches them.

    ``literals`` are graph constants that depend on how many channels the group has (the
    bounds of a channel slice, the sizes of a split): a change of width rewrites them.
    ``uniform`` says why a replication must copy every channel the same number of times
    (a layer norm or a mean over the channels keeps its statistics only then).
    ``blockers`` say why the channels cannot move at all, ``width_blockers`` why their number
    is fixed (a reshape spells it, attention heads split it), ``replication_blockers`` why
    copies of them would change the output (statistics over groups of channels).
    """

    id: int
    channels: int
    blocks: int = 1
    multiple: int = 1
    producers: list[Endpoint] = field(default_factory=list)
    followers: list[Endpoint] = field(default_factory=list)
    consumers: list[Endpoint] = field(default_factory=list)
    literals: list[Endpoint] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    replication_blockers: list[str] = field(default_factory=list)
    width_blockers: list[str] = field(default_factory=list)
    uniform: list[str] = field(default_factory=list)

    def obstacle(self, replicate: bool) -> str | None:
        """Why the channels cannot be permuted (or, with ``replicate``, replicated/added) exactly; None if they can.

        ``blocks`` > 1 is not an obstacle: grouped convs only ask that channels move within
        each of ``blocks`` equal contiguous blocks.
        """
        reasons = self.blockers + (self.width_blockers + self.replication_blockers if replicate else [])
        return reasons[0] if reasons else None

    def resize_obstacle(self) -> str | None:
        """Why the number of channels cannot change at all (slimming keeps a subset); None if it can."""
        reasons = self.blockers + self.width_blockers
        return reasons[0] if reasons else None


@dataclass
class ChannelAnalysis:
    """Layouts of every node's output and the coupled groups, for one graph and one input shape."""

    graph: fx.Graph
    shapes: Shapes
    layouts: dict[str, Layout]
    groups: dict[int, ChannelGroup]

    def layout(self, node: str) -> Layout | None:
        return self.layouts.get(node)

    def group_at(self, name: str) -> ChannelGroup:
        """The group of the channels a module path or node name outputs (a single, unflattened group)."""
        node = GraphIndex(self.graph).node(name)
        layout = self.layouts.get(node.name)
        if layout is None:
            raise SurgeryError(f"the output of '{name}' (node {node.name}) carries no channels the analysis follows")
        if len(layout.segments) != 1 or layout.segments[0].inner != 1:
            parts = ", ".join(f"{s.channels}" + (f"x{s.inner}" if s.inner > 1 else "") for s in layout.segments)
            raise SurgeryError(
                f"the output of '{name}' holds several channel groups ({parts}: a concatenation, or channels split "
                "further on); name one of the layers that write them"
            )
        return self.groups[layout.segments[0].group]

    def writes_whole_group(self, producer: Endpoint) -> bool:
        """True when ``producer``'s output is one group, unflattened (not channels split into several groups later)."""
        layout = self.layouts.get(producer.space)
        return layout is not None and len(layout.segments) == 1 and layout.segments[0].inner == 1

    def producer_groups(self) -> list[tuple[Endpoint, ChannelGroup]]:
        """Every producer whose output is one whole group, with that group, in graph order."""
        pairs = [(p, g) for g in self.groups.values() for p in g.producers if self.writes_whole_group(p)]
        order = {n.name: i for i, n in enumerate(self.graph.nodes)}
        return sorted(pairs, key=lambda pg: order[pg[0].node])
