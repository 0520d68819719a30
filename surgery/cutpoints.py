"""List where a network can be cut: module paths at every depth and fx node names.

>>> import torch, torchvision, surgery
>>> points = surgery.cut_points(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
>>> p = next(p for p in points if p.name == "layer2")
>>> p.shape, p.crossing
('128x8x8', 1)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from surgery.errors import running_on
from surgery._util import evaluating
from surgery.names import GraphIndex
from surgery.specs import ValueSpec
from surgery.tracing import LeafSpec, trace_graph


@dataclasses.dataclass
class CutPoint:
    """A place to cut, in graph order.

    ``crossing`` is how many values cross a cut here (1 at a stage boundary, more
    inside a residual block); ``params`` and ``flops`` count everything computed up to
    and including this point (FLOPs need an example input).
    """

    name: str
    kind: str  # "module" or "node"
    node: str
    position: int
    depth: int
    crossing: int
    shape: str | None = None
    params: int = 0
    flops: int | None = None


def _params_by_position(model: nn.Module, index: GraphIndex) -> list[int]:
    """Cumulative count of distinct parameter elements used by the nodes up to each position."""
    seen: set[int] = set()
    total = 0
    out = []
    for n in index.nodes:
        tensors: list[torch.Tensor] = []
        if n.op == "call_module":
            tensors = list(model.get_submodule(str(n.target)).parameters())
        elif n.op == "get_attr":
            obj: Any = model
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            tensors = [obj] if isinstance(obj, nn.Parameter) else []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        out.append(total)
    return out


class _Recorder(fx.Interpreter):
    """Runs the graph recording each node's output spec and the FLOPs counted so far."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter = counter
        self.specs: dict[fx.Node, ValueSpec] = {}
        self.flops: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.specs[n] = ValueSpec.of(out)
        self.flops[n] = int(self.counter.get_total_flops())
        return out


@torch.no_grad()
def _record(model: nn.Module, graph: fx.Graph, example: tuple[Any, ...]) -> _Recorder:
    gm = fx.GraphModule(model, graph)
    gm.eval()
    with FlopCounterMode(display=False) as counter:
        rec = _Recorder(gm, counter)
        with running_on(example):
            rec.run(*example)
    return rec


def cut_points(
    model: nn.Module,
    example_input: Any = None,
    *,
    depth: int | None = None,
    include_nodes: bool = True,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> list[CutPoint]:
    """The candidate cut names of ``model`` in graph order.

    Args:
        model: any fx-traceable module.
        example_input: optional input (tensor or tuple); adds output shapes and FLOPs.
        depth: keep module paths with at most this many dots + 1 (``layer2`` is 1,
            ``layer2.1`` is 2); ``None`` keeps all.
        include_nodes: also list fx node names (``add_3``, ``flatten``).
    """
    graph = trace_graph(model, leaf_modules, concrete_args)
    index = GraphIndex(graph)
    last_compute = max(i for i, n in enumerate(index.nodes) if n.op not in ("output", "get_attr"))
    params = _params_by_position(model, index)
    rec = None
    if example_input is not None:
        example = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
        with evaluating(model):
            rec = _record(model, graph, example)

    entries: list[tuple[int, int, str, str]] = []  # (position, depth, kind, name)
    for path, calls in index.module_calls.items():
        d = path.count(".") + 1
        if len(calls) == 1 and (depth is None or d <= depth):
            entries.append((max(calls[0]), d, "module", path))
    if include_nodes:
        entries += [(p, 99, "node", name) for name, p in index.node_names.items()]
    entries.sort(key=lambda e: (e[0], e[1]))

    points = []
    for p, d, kind, name in entries:
        if p >= last_compute:
            continue
        n = index.nodes[p]
        points.append(
            CutPoint(
                name=name,
                kind=kind,
                node=n.name,
                position=p,
                depth=d if kind == "module" else 0,
                crossing=len(index.live_after(p)),
                shape=str(rec.specs[n]) if rec else None,
                params=params[p],
                flops=rec.flops[n] if rec else None,
            )
        )
    return points
