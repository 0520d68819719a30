"""Cut a network at named points into pieces whose composition is the network, exactly.

>>> import torch, torchvision, surgery
>>> net = torchvision.models.resnet18().eval()
>>> pieces = surgery.cut(net, at=["layer2", "layer3.0.conv2"])
>>> len(pieces)
3
>>> x = torch.randn(2, 3, 64, 64)
>>> torch.equal(pieces(x), net(x))
True

Every value still needed after a cut crosses it: a cut inside a residual block hands
both the branch and the block input to the next piece (as a tuple, the cut node's
value first), so nothing is recomputed and the result is bit-identical. Pieces share
parameters with the model they were cut from, like
``torchvision.models.feature_extraction``; ``copy.deepcopy`` the model first to detach them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from surgery.errors import SurgeryError, running_on
from surgery._util import evaluating
from surgery.flops import count_flops, count_params
from surgery.names import GraphIndex
from surgery.recipe import Recipe, recipe_of
from surgery.specs import ValueSpec, format_specs, specs_of
from surgery.tracing import LeafSpec, trace_graph

META_KEY = "surgery"


@dataclasses.dataclass
class Origin:
    """Where a piece came from: enough to rebuild it (recipe, cut names, index, trace options)."""

    recipe: Recipe | None
    cuts: tuple[str, ...]
    index: int
    leaf_modules: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.recipe.to_json() if self.recipe else None,
            "cuts": list(self.cuts),
            "index": self.index,
            "leaf_modules": list(self.leaf_modules),
        }


@dataclasses.dataclass
class PieceInfo:
    """A piece's boundary: the fx names of the values it takes and returns, and their specs."""

    origin: Origin | None
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    in_specs: tuple[ValueSpec, ...] | None = None
    out_specs: tuple[ValueSpec, ...] | None = None

    @property
    def in_arity(self) -> int:
        return len(self.in_names)

    @property
    def out_arity(self) -> int:
        return len(self.out_names)


def piece_info(module: nn.Module) -> PieceInfo:
    """Boundary information of any part of a :class:`Pieces` (pieces, adapters, plain modules)."""
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get(META_KEY), PieceInfo):
        return meta[META_KEY]
    spec_in = getattr(module, "in_spec", None)
    spec_out = getattr(module, "out_spec", None)
    return PieceInfo(
        None,
        ("input",),
        ("output",),
        (spec_in,) if isinstance(spec_in, ValueSpec) else None,
        (spec_out,) if isinstance(spec_out, ValueSpec) else None,
    )


def _as_args(example: Any) -> tuple[Any, ...]:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


@dataclasses.dataclass
class PieceSummary:
    index: int
    inputs: str
    outputs: str
    params: int
    flops: int


class Pieces(nn.Module):
    """An ordered sequence of pieces; calling it runs them in order.

    ``pieces[i]`` is the i-th piece (an ``nn.Module``), ``pieces[i:j]`` a ``Pieces``
    of the range. A boundary that holds several values is passed on as a tuple and
    received as positional arguments.
    """

    def __init__(self, pieces: Sequence[nn.Module], cuts: Sequence[str] | None = None):
        super().__init__()
        if not pieces:
            raise SurgeryError("a Pieces needs at least one piece")
        self.pieces = nn.ModuleList(pieces)
        self.training = all(p.training for p in pieces)
        self.cuts = list(cuts) if cuts is not None else [f"boundary{i}" for i in range(len(pieces) - 1)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.pieces[0](*args, **kwargs)
        for k in range(1, len(self.pieces)):
            out = self.pieces[k](*self._boundary_args(k, out))
        return out

    def __len__(self) -> int:
        return len(self.pieces)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.pieces)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            idx = range(len(self))[i]
            if idx.step != 1 or not idx:
                raise SurgeryError("slice Pieces with a contiguous, non-empty range (step 1)")
            return Pieces([self.pieces[k] for k in idx], self.cuts[idx.start : idx.stop - 1])
        return self.pieces[i]

    def infos(self) -> list[PieceInfo]:
        return [piece_info(p) for p in self.pieces]

    def _boundary_args(self, k: int, value: Any) -> tuple[Any, ...]:
        """The positional arguments piece ``k`` receives, given what piece ``k-1`` returned."""
        return value if piece_info(self.pieces[k - 1]).out_arity > 1 else (value,)

    @torch.no_grad()
    def _walk(self, example: tuple[Any, ...]) -> Iterator[tuple[int, nn.Module, tuple[Any, ...], Any]]:
        """Run ``example`` through in eval mode, yielding ``(k, piece, args, output)`` per piece."""
        with evaluating(self):
            args = example
            for k, piece in enumerate(self.pieces):
                with running_on(args, f"piece {k}"):
                    out = piece(*args)
                yield k, piece, args, out
                if k + 1 < len(self):
                    args = self._boundary_args(k + 1, out)

    def infer_specs(self, *example: Any) -> Pieces:
        """Record the specs of every boundary by running ``example`` through (eval mode)."""
        for _, piece, args, out in self._walk(example):
            if META_KEY in getattr(piece, "meta", {}):
                info = piece_info(piece)
                info.in_specs = tuple(ValueSpec.of(a) for a in args)
                info.out_specs = specs_of(out, info.out_arity)
        return self

    def summary(self, *example: Any) -> list[PieceSummary]:
        """Per piece: input/output specs, parameters and forward FLOPs on ``example``."""
        rows = []
        for k, piece, args, out in self._walk(example):
            rows.append(
                PieceSummary(
                    k,
                    format_specs(tuple(ValueSpec.of(a) for a in args)),
                    format_specs(specs_of(out, piece_info(piece).out_arity)),
                    count_params(piece),
                    count_flops(piece, *args),
                )
            )
        return rows

    def save(self, directory: str, *, force: bool = False) -> None:
        """Save as safetensors weights + a JSON recipe (see :func:`surgery.save`)."""
        from surgery.io import save

        save(self, directory, force=force)


def cut(
    model: nn.Module,
    at: str | Sequence[str],
    example_input: Any = None,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Pieces:
    """Cut ``model`` after each named point: N names give N+1 pieces.

    Args:
        model: any fx-traceable module (or a GraphModule).
        at: module paths (``"layer2"``, ``"features.7"``) or fx node names
            (``"add_3"``), in graph order.
        example_input: optional input (tensor or tuple) used to record the shape of
            every boundary (``pieces.infos()[k].out_specs``).
        leaf_modules, concrete_args: passed to :func:`surgery.trace`.

    Returns:
        :class:`Pieces`; ``torch.equal(pieces(x), model(x))`` holds in eval mode.
        Each piece owns only the parameters it uses (shared with ``model``).
    """
    names = [at] if isinstance(at, str) else list(at)
    if not names:
        raise SurgeryError("give at least one cut name (e.g. at='layer2')")
    graph = trace_graph(model, leaf_modules, concrete_args)
    index = GraphIndex(graph)
    positions = [index.resolve(name) for name in names]
    for (a, pa), (b, pb) in zip(zip(names, positions), zip(names[1:], positions[1:])):
        if a == b:
            raise SurgeryError(f"cut '{a}' is given twice; give each cut once")
        if pb <= pa:
            raise SurgeryError(
                f"cuts must be in graph order: '{b}' (node {index.nodes[pb].name}) does not come after "
                f"'{a}' (node {index.nodes[pa].name}); reorder them"
            )
    last_compute = max(i for i, n in enumerate(index.nodes) if n.op not in ("output", "get_attr"))
    if positions[-1] >= last_compute:
        raise SurgeryError(f"cutting at '{names[-1]}' leaves the last piece empty; cut earlier in the graph")
    origin_recipe = recipe_of(model)
    leaf_names = tuple(m if isinstance(m, str) else f"{m.__module__}:{m.__qualname__}" for m in leaf_modules)
    graphs = split_graph(index, positions)
    pieces = []
    for k, (g, ins, outs) in enumerate(graphs):
        gm = fx.GraphModule(model, g, class_name="Piece")
        gm.training = model.training  # its submodules are the model's own, already in that mode
        gm.meta[META_KEY] = PieceInfo(
            Origin(origin_recipe, tuple(names), k, leaf_names),
            tuple(n.name for n in ins) if ins is not None else tuple(n.name for n in g.nodes if n.op == "placeholder"),
            tuple(n.name for n in outs) if outs is not None else ("output",),
        )
        pieces.append(gm)
    result = Pieces(pieces, names)
    if example_input is not None:
        result.infer_specs(*_as_args(example_input))
    return result


def split_graph(
    index: GraphIndex, positions: Sequence[int]
) -> list[tuple[fx.Graph, list[fx.Node] | None, list[fx.Node] | None]]:
    """Split the indexed graph after each position: ``(graph, crossing-in, crossing-out)`` per piece.

    Piece k holds the nodes in ``(positions[k-1], positions[k]]`` in their original
    order (so in-place ops keep their order); ``get_attr`` nodes are re-created in
    every piece that reads them.
    """
    nodes = index.nodes
    bounds = [-1, *positions, index.output_position]
    crossing = [index.live_after(p, first=nodes[p]) for p in positions]
    out: list[tuple[fx.Graph, list[fx.Node] | None, list[fx.Node] | None]] = []
    for k in range(len(bounds) - 1):
        ins = crossing[k - 1] if k > 0 else None
        outs = crossing[k] if k < len(positions) else None
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for v in ins or ():
            env[v] = g.placeholder(v.name)

        def arg(a: fx.Node, g: fx.Graph = g, env: dict[fx.Node, fx.Node] = env) -> fx.Node:
            got = env.get(a)
            if got is None:  # a parameter or constant read in this piece
                got = env[a] = g.get_attr(a.target)
            return got

        for n in nodes[bounds[k] + 1 : bounds[k + 1] + 1]:
            if n.op != "get_attr":
                new = g.create_node(n.op, n.target, fx.map_arg(n.args, arg), fx.map_arg(n.kwargs, arg), n.name, n.type)
                new.meta = dict(n.meta)
                env[n] = new
        if outs is not None:
            g.output(env[outs[0]] if len(outs) == 1 else tuple(env[v] for v in outs))
        out.append((g, ins, outs))
    return out
