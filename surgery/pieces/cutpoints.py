"""List where a network can be cut: module paths at every depth, containers, and node names.

>>> import torch, torchvision, surgery
>>> points = surgery.cut_points(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
>>> p = next(p for p in points if p.name == "layer2")
>>> p.shape, p.crossing, p.bytes          # bytes crossing a cut here, per sample: 128*8*8 float32
('128x8x8', 1, 32768)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from surgery.core.errors import running_on
from surgery.core.specs import ValueSpec
from surgery.core.util import evaluating
from surgery.graph.capture import capture
from surgery.graph.fx import LeafSpec
from surgery.graph.inputs import Example
from surgery.graph.names import GraphIndex
from surgery.pieces.boundary import boundary


@dataclasses.dataclass
class CutPoint:
    """A place to cut, in graph order.

    ``crossing`` is how many values cross a cut here (1 at a stage boundary, more
    inside a residual block) and ``bytes`` their total size per sample (their tensors'
    bytes on the example input divided by its batch size; sizes and other non-tensor
    values count 0); ``params`` and ``flops`` count everything computed up to and
    including this point. ``shape``, ``bytes`` and ``flops`` need an example input.

    >>> import torchvision, surgery
    >>> point = surgery.cut_points(torchvision.models.resnet18(), depth=1, include_nodes=False)[4]
    >>> point.name, point.kind, point.crossing
    ('layer1', 'module', 1)
    """

    name: str
    kind: str  # "module", "container" (a ModuleList or Sequential forward loops over) or "node"
    node: str
    position: int
    depth: int
    crossing: int
    shape: str | None = None
    params: int = 0
    flops: int | None = None
    bytes: int | None = None


def value_bytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (a tensor, or nested tuples/lists/dicts); other values count 0.

    >>> value_bytes((torch.zeros(2, 3), torch.zeros(4, dtype=torch.int64), 7))
    56
    """
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def batch_size(example: Sequence[Any]) -> int:
    """The first dimension of the first tensor of ``example`` (1 when there is none)."""
    tensors = (t for t in pytree.tree_leaves(list(example)) if isinstance(t, torch.Tensor) and t.dim())
    return next((int(t.shape[0]) for t in tensors), 1)


def _params_by_position(model: nn.Module, index: GraphIndex) -> list[int]:
    """Cumulative count of distinct parameter elements used by the nodes up to each position.

    A parameter read through a ``get_attr`` node counts where a node first uses it (an
    exported graph fetches every parameter at its start).
    """
    seen: set[int] = set()
    total = 0
    out = []

    def attr(target: str) -> Any:
        obj: Any = model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    for n in index.nodes:
        tensors: list[torch.Tensor] = (
            list(model.get_submodule(str(n.target)).parameters()) if n.op == "call_module" else []
        )
        reads: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), reads.append)
        tensors += [attr(str(a.target)) for a in reads if a.op == "get_attr"]
        for t in tensors:
            if isinstance(t, nn.Parameter) and id(t) not in seen:
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
        self.nbytes: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.specs[n] = ValueSpec.of(out)
        self.nbytes[n] = value_bytes(out)
        self.flops[n] = int(self.counter.get_total_flops())
        return out


@torch.no_grad()
def _record(root: nn.Module, graph: fx.Graph, example: Example) -> _Recorder:
    gm = fx.GraphModule(root, graph)
    gm.eval()
    with FlopCounterMode(display=False) as counter:
        rec = _Recorder(gm, counter)
        with running_on(tuple(example.tensors())):
            rec.run(*example.flat(graph), enable_io_processing=False)
    return rec


def cut_points(
    model: nn.Module,
    example_input: Any = None,
    *,
    depth: int | None = None,
    include_nodes: bool = True,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    tracer: str = "auto",
) -> list[CutPoint]:
    """The candidate cut names of ``model`` in graph order.

    Args:
        model: any ``nn.Module`` (captured by :func:`surgery.graph.capture.capture`).
        example_input: optional input (tensor, tuple, dict of keyword inputs or
            :class:`~surgery.graph.inputs.Example`); adds output shapes, bytes and FLOPs.
        depth: keep module paths with at most this many dots + 1 (``layer2`` is 1,
            ``layer2.1`` is 2); ``None`` keeps all.
        include_nodes: also list node names (``add_3``, ``flatten``).
        leaf_modules, concrete_args, tracer: see :func:`surgery.graph.capture.capture`.

    >>> import torch, torchvision, surgery
    >>> net = torchvision.models.resnet18(num_classes=10)
    >>> [p.name for p in surgery.cut_points(net, depth=1, include_nodes=False)]
    ['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4', 'avgpool']
    >>> p = surgery.cut_points(net, torch.randn(1, 3, 32, 32), depth=1, include_nodes=False)[5]
    >>> p.name, p.shape, p.bytes
    ('layer2', '128x4x4', 8192)
    """
    example = Example.of(example_input)
    cap = capture(model, example, tracer=tracer, leaf_modules=leaf_modules, concrete_args=concrete_args)
    index = GraphIndex(cap.graph)
    last_compute = max(i for i, n in enumerate(index.nodes) if n.op not in ("output", "get_attr"))
    params = _params_by_position(cap.root, index)
    rec, batch = None, 1
    example = example if example is not None else cap.example
    if example is not None:
        with evaluating(model):
            rec = _record(cap.root, cap.graph, example)
        batch = batch_size(tuple(example.tensors()))

    entries: list[tuple[int, int, str, str]] = []  # (position, depth, kind, name)
    for path, calls in index.module_calls.items():
        d = path.count(".") + 1
        if len(calls) == 1 and (depth is None or d <= depth):
            entries.append((max(calls[0]), d, "module", path))
    for path, end in index.containers.items():
        d = path.count(".") + 1
        if depth is None or d <= depth:
            entries.append((end, d, "container", path))
    if include_nodes:
        entries += [(p, 99, "node", name) for name, p in index.node_names.items()]
    entries.sort(key=lambda e: (e[0], e[1]))

    points = []
    for p, d, kind, name in entries:
        if p >= last_compute:
            continue
        n = index.nodes[p]
        live = boundary(index, p).values  # what crosses: constants and sizes a crossing tensor holds stay inside
        points.append(
            CutPoint(
                name=name,
                kind=kind,
                node=n.name,
                position=p,
                depth=d if kind != "node" else 0,
                crossing=len(live),
                shape=str(rec.specs[n]) if rec else None,
                params=params[p],
                flops=rec.flops[n] if rec else None,
                bytes=round(sum(rec.nbytes[v] for v in live) / batch) if rec else None,
            )
        )
    return points
