"""Resolve user names (module paths or node names) to positions in a captured graph.

A module path (``layer2``, ``layer2.1``, ``features.7``) names the point right after
the last node its call computes; a container that ``forward`` loops over instead of
calling (``blocks``, ``model.layers``: a ModuleList, ModuleDict or Sequential) names the
point right after the last node computed inside it; a node name (``add_3``,
``layer1_0_relu_1``) names the point right after that node. Module paths come from each
node's ``meta['nn_module_stack']``, which torch.fx and torch.export both record, so a
module path means the same point whichever front-end captured the graph.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch.utils._pytree as pytree
from torch import fx

from surgery.core.errors import SurgeryError, did_you_mean

_SKIP_OPS = ("placeholder", "output", "get_attr")
RETURNED = "surgery_returned"  # node.meta key: {module path: index of this node's value in what that module returned}


def mark_returned(value: Any, path: str) -> None:
    """Record, on each traced value in ``value`` (what the module at ``path`` returned), its place in it.

    The fx front-end calls it after each module call, so a cut after a module that
    returns several values hands them over in the module's own order.
    """
    leaves = pytree.tree_leaves(value)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, fx.Proxy):
            leaf.node.meta.setdefault(RETURNED, {}).setdefault(path, i)


@dataclass
class GraphIndex:
    """Positions of the nodes of one graph and the module calls that produced them."""

    graph: fx.Graph
    nodes: list[fx.Node] = field(init=False)
    position: dict[fx.Node, int] = field(init=False)
    module_calls: dict[str, list[list[int]]] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        calls: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, n in enumerate(self.nodes):
            if n.op in _SKIP_OPS:
                continue
            for key, value in (n.meta.get("nn_module_stack") or {}).items():
                path = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else key
                if path.startswith("_empty_nn_module_stack"):  # torch.export's marker for nodes of no module
                    continue
                call = key.partition("@")[2]
                calls[path][int(call) if call.isdigit() else 0].append(i)
            if n.op == "call_module" and not n.meta.get("nn_module_stack"):
                calls[str(n.target)][0].append(i)
        self.module_calls = {p: [c[k] for k in sorted(c)] for p, c in calls.items() if p}

    @cached_property
    def output_position(self) -> int:
        return next(i for i, n in enumerate(self.nodes) if n.op == "output")

    @cached_property
    def node_names(self) -> dict[str, int]:
        return {n.name: i for i, n in enumerate(self.nodes) if n.op not in _SKIP_OPS}

    def module_end(self, path: str) -> int:
        """Position of the last node of the (single) call of module ``path``."""
        calls = self.module_calls[path]
        if len(calls) > 1:
            ends = [self.nodes[max(c)].name for c in calls]
            raise SurgeryError(
                f"module '{path}' is called {len(calls)} times; cut at one call by its fx node name: {', '.join(ends)}"
            )
        return max(calls[0])

    @cached_property
    def containers(self) -> dict[str, int]:
        """Module paths never called themselves but holding called modules, with the position of their last node."""
        ends: dict[str, int] = {}
        for path, calls in self.module_calls.items():
            parts = path.split(".")
            for k in range(1, len(parts)):
                prefix = ".".join(parts[:k])
                if prefix not in self.module_calls:
                    ends[prefix] = max(ends.get(prefix, -1), max(max(c) for c in calls))
        return ends

    def resolve(self, name: str) -> int:
        """Position of the cut named ``name`` (module path, then container, then node name)."""
        if name in self.module_calls:
            return self.module_end(name)
        if name in self.containers:
            return self.containers[name]
        if name in self.node_names:
            return self.node_names[name]
        raise SurgeryError(
            f"'{name}' is not a module path or node name of this model ({did_you_mean(name, self.all_names())}); "
            "list them with surgery.cut_points(model) or `surgery nodes MODEL`"
        )

    def all_names(self) -> list[str]:
        return list(self.module_calls) + list(self.containers) + list(self.node_names)

    def node(self, name: str) -> fx.Node:
        """The node whose output the name refers to (the last node of a module's call)."""
        return self.nodes[self.resolve(name)]

    @cached_property
    def last_use(self) -> list[int]:
        """For each position, the position of its last user (or itself when unused)."""
        pos = self.position
        return [max((pos[u] for u in n.users), default=i) for i, n in enumerate(self.nodes)]

    def returned(self, name: str) -> list[fx.Node]:
        """The values the module ``name`` returned, in its order, where the front-end recorded them (fx); else []."""
        marked = [n for n in self.nodes if name in n.meta.get(RETURNED, {})]
        return sorted(marked, key=lambda n: n.meta[RETURNED][name])

    def live_after(self, p: int, first: fx.Node | None = None) -> list[fx.Node]:
        """Values computed at or before ``p`` and still used after it (``first`` leads; then graph order).

        ``get_attr`` nodes never cross a boundary: each piece fetches its own parameters.
        """
        last = self.last_use
        live = [n for n in self.nodes[: p + 1] if n.op != "get_attr" and last[self.position[n]] > p]
        if first is not None and first in live:
            live.remove(first)
            live.insert(0, first)
        return live
