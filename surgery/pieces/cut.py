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
value first; after a module that returns several values, those values first, in its
order), so nothing is recomputed and the result is bit-identical. Constants (an
optional input left at its default) and sizes a crossing tensor holds stay inside
the pieces (:mod:`surgery.pieces.boundary`): pieces hand over tensors. The graph comes
from :func:`surgery.graph.capture.capture` (torch.fx, or torch.export for models fx cannot
trace): the first piece takes the same call as the model (keyword inputs such as
``input_ids=...`` included) and the last returns what the model returns (a Hugging Face
``ModelOutput`` stays one). Pieces share parameters with the model they were cut from,
like ``torchvision.models.feature_extraction``; ``copy.deepcopy`` the model first to
detach them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from surgery.core.errors import SurgeryError, running_on
from surgery.core.recipe import Recipe, recipe_of
from surgery.core.specs import ValueSpec, format_specs, graph_specs, specs_of
from surgery.core.util import evaluating
from surgery.graph.capture import Capture, capture
from surgery.graph.flops import count_flops, count_params
from surgery.graph.fx import LeafSpec
from surgery.graph.inputs import Example, InputSpec
from surgery.graph.names import GraphIndex
from surgery.pieces.boundary import boundary, guard_defaults, receive, returned_order
from surgery.pieces.recut import RECUT_KEY, Recut, recut_of

META_KEY = "surgery"


@dataclasses.dataclass
class Origin:
    """Where a piece came from: enough to rebuild it (recipe, cut names, index, trace options)."""

    recipe: Recipe | None
    cuts: tuple[str, ...]
    index: int
    leaf_modules: tuple[str, ...] = ()
    tracer: str = "fx"
    inputs: tuple[InputSpec, ...] = ()  # what torch.export ran on (the graph is captured again from these)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.recipe.to_json() if self.recipe else None,
            "cuts": list(self.cuts),
            "index": self.index,
            "leaf_modules": list(self.leaf_modules),
            "tracer": self.tracer,
            "inputs": [s.model_dump() for s in self.inputs],
        }


@dataclasses.dataclass
class PieceInfo:
    """A piece's boundary: the fx names of the values it takes and returns, and their specs."""

    origin: Origin | None
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    in_specs: tuple[ValueSpec | None, ...] | None = None
    out_specs: tuple[ValueSpec | None, ...] | None = None

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
    names = tuple(getattr(module, "boundary_names", ("input",)))  # an adapter may pass side values through
    side = (None,) * (len(names) - 1)
    return PieceInfo(
        None,
        names,
        ("output", *names[1:]),
        (spec_in, *side) if isinstance(spec_in, ValueSpec) else None,
        (spec_out, *side) if isinstance(spec_out, ValueSpec) else None,
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
    received as positional arguments. ``pieces.export(directory, format, ...)`` writes
    them as ONNX or ``.pt2`` files (the method is :func:`surgery.export`, bound there).

    >>> import torch, torchvision, surgery
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> pieces = surgery.cut(net, ["layer1", "layer3"])
    >>> x = torch.randn(2, 3, 32, 32)
    >>> len(pieces), pieces.cuts, torch.equal(pieces[1:](pieces[0](x)), net(x))
    (3, ['layer1', 'layer3'], True)
    """

    def __init__(self, pieces: Sequence[nn.Module], cuts: Sequence[str] | None = None):
        super().__init__()
        if not pieces:
            raise SurgeryError("a Pieces needs at least one piece")
        self.pieces = nn.ModuleList(pieces)
        self.training = self.pieces.training = all(p.training for p in pieces)
        self.cuts = list(cuts) if cuts is not None else [f"boundary{i}" for i in range(len(pieces) - 1)]
        self._recut = recut_of(pieces)  # cuts the model again for calls the first piece's graph does not take

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own call: the inputs the first piece takes, or others (see :mod:`surgery.pieces.recut`)."""
        if self._recut is not None:
            return self._recut.run(self, args, kwargs)
        return self.run(*args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run the pieces on their own graphs: the call must be one the first piece takes."""
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
    def _walk(self, example: Example) -> Iterator[tuple[int, nn.Module, tuple[Any, ...], Any]]:
        """Run ``example`` through in eval mode, yielding ``(k, piece, inputs, output)`` per piece.

        ``inputs`` are the values piece k received (for the first piece: the example's
        positional inputs, then its keyword inputs).
        """
        with evaluating(self):
            args: tuple[Any, ...] = (*example.args, *example.kwargs.values())
            for k, piece in enumerate(self.pieces):
                with running_on(args, f"piece {k}"):
                    out = example(piece) if k == 0 else piece(*args)
                yield k, piece, args, out
                if k + 1 < len(self):
                    args = self._boundary_args(k + 1, out)

    def infer_specs(self, *example: Any) -> Pieces:
        """Record the specs of every boundary by running ``example`` through (eval mode).

        ``example``: the model's positional inputs, or one :class:`~surgery.graph.inputs.Example`.
        """
        for _, piece, args, out in self._walk(_as_example(example)):
            if META_KEY in getattr(piece, "meta", {}):
                info = piece_info(piece)
                info.in_specs = tuple(ValueSpec.of(a) for a in args)
                info.out_specs = specs_of(out, info.out_arity)
        return self

    def specs_from_graphs(self) -> bool:
        """Record every boundary's specs from the values the graphs recorded (torch.export's), without a run.

        Returns False, recording nothing, when some piece's graph does not carry them (fx
        graphs carry no shapes; :meth:`infer_specs` runs an example through instead).
        """
        recorded = [
            graph_specs(p.graph, piece_info(p).out_arity)
            if isinstance(p, fx.GraphModule) and META_KEY in getattr(p, "meta", {})
            else None
            for p in self.pieces
        ]
        found = [f for f in recorded if f is not None]
        if len(found) < len(recorded):
            return False
        for piece, (ins, outs) in zip(self.pieces, found):
            info = piece_info(piece)
            info.in_specs, info.out_specs = ins, outs
        return True

    def summary(self, *example: Any) -> list[PieceSummary]:
        """Per piece: input/output specs, parameters and forward FLOPs on ``example``."""
        ex = _as_example(example)
        rows = []
        for k, piece, args, out in self._walk(ex):
            rows.append(
                PieceSummary(
                    k,
                    format_specs(tuple(ValueSpec.of(a) for a in args)),
                    format_specs(specs_of(out, piece_info(piece).out_arity)),
                    count_params(piece),
                    count_flops(piece, *ex.args, **ex.kwargs) if k == 0 else count_flops(piece, *args),
                )
            )
        return rows


def _as_example(example: tuple[Any, ...]) -> Example:
    """``(x,)``, ``(x, y)`` or ``(Example,)`` as an Example."""
    if len(example) == 1 and isinstance(example[0], Example):
        return example[0]
    return Example(tuple(example), {})


def cut(
    model: nn.Module,
    at: str | Sequence[str],
    example_input: Any = None,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    tracer: str = "auto",
    dynamic: bool = True,
) -> Pieces:
    """Cut ``model`` after each named point: N names give N+1 pieces.

    Args:
        model: any ``nn.Module`` (captured by :func:`surgery.graph.capture.capture`) or a GraphModule.
        at: module paths (``"layer2"``, ``"features.7"``, a container such as
            ``"blocks"``) or node names (``"add_3"``), in graph order.
        example_input: optional input (a tensor, a tuple of positional inputs, a dict of
            keyword inputs, or an :class:`~surgery.graph.inputs.Example`) whose boundary shapes
            are recorded (``pieces.infos()[k].out_specs``: from the values a torch.export
            graph records, else by running it through the pieces); torch.export
            captures on it.
        leaf_modules, concrete_args: passed to the fx front-end.
        tracer: ``"auto"`` (fx, fx with automatic leaves, torch.export), ``"fx"`` or ``"export"``.
        dynamic: torch.export leaves every dimension free where the model allows it; False
            fixes them at the example's sizes (other sizes are then cut again when called).

    Returns:
        :class:`Pieces`; ``torch.equal(pieces(x), model(x))`` holds in eval mode.
        Each piece owns only the parameters it uses (shared with ``model``).

    >>> import torch, torchvision, surgery
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> head, tail = surgery.cut(net, "layer2", torch.randn(1, 3, 32, 32))
    >>> x = torch.randn(2, 3, 32, 32)
    >>> tuple(head(x).shape), torch.equal(tail(head(x)), net(x))
    ((2, 128, 4, 4), True)
    """
    names = [at] if isinstance(at, str) else list(at)
    if not names:
        raise SurgeryError("give at least one cut name (e.g. at='layer2')")
    example = Example.of(example_input)
    cap = capture(
        model, example, tracer=tracer, leaf_modules=leaf_modules, concrete_args=concrete_args, dynamic=dynamic
    )
    index = GraphIndex(cap.graph)
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
    pieces = _pieces(model, cap, index, positions, names, leaf_modules)
    recut = None if concrete_args else Recut.of(model, cap, tracer, names, (*leaf_modules, *cap.leaves), cut)
    for k, piece in enumerate(pieces if recut is not None else ()):
        piece.meta[RECUT_KEY] = (recut, k)
    result = Pieces(pieces, names)
    example = example if example is not None else cap.example
    if example is not None and not result.specs_from_graphs():
        result.infer_specs(example)
    return result


def _pieces(
    model: nn.Module,
    cap: Capture,
    index: GraphIndex,
    positions: list[int],
    names: list[str],
    leaf_modules: Sequence[LeafSpec],
) -> list[fx.GraphModule]:
    leaf_names = (
        tuple(m if isinstance(m, str) else f"{m.__module__}:{m.__qualname__}" for m in leaf_modules) + cap.leaves
    )
    inputs = tuple(cap.example.specs()) if cap.tracer == "export" and cap.example is not None else ()
    origin_recipe = recipe_of(model)
    pieces: list[fx.GraphModule] = []
    firsts = [returned_order(model, cap.example, index, name) or [index.nodes[p]] for name, p in zip(names, positions)]
    for k, (g, ins, outs) in enumerate(split_graph(index, positions, firsts)):
        gm = _LazyGraphModule(cap.root, g, class_name="Piece")  # its code is generated when first run
        gm.train(model.training)
        gm.meta[META_KEY] = PieceInfo(
            Origin(origin_recipe, tuple(names), k, leaf_names, cap.tracer if cap.tracer != "graph" else "fx", inputs),
            tuple(n.name for n in ins) if ins is not None else tuple(n.name for n in g.nodes if n.op == "placeholder"),
            tuple(n.name for n in outs) if outs is not None else ("output",),
        )
        pieces.append(gm)
    return pieces


def _codegen(source: CodeGen, first: bool, last: bool) -> CodeGen:
    """The calling convention of a piece: the model's own inputs (first piece) and outputs (last piece)."""
    if not isinstance(source, _PyTreeCodeGen) or source.pytree_info is None:
        return CodeGen()
    info = source.pytree_info
    if first and last:
        return _PyTreeCodeGen(info)
    if first:
        return _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None))
    if last:
        return _OutputsOnly(_PyTreeInfo([], None, info.out_spec))  # type: ignore[arg-type]  # torch allows no in_spec
    return CodeGen()


class _OutputsOnly(_PyTreeCodeGen):
    """Plain positional inputs, outputs rebuilt into the model's output structure (a ModelOutput, say)."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)

    def process_inputs(self, *inputs: Any) -> Any:
        return inputs


def split_graph(
    index: GraphIndex, positions: Sequence[int], firsts: Sequence[Sequence[fx.Node]] | None = None
) -> list[tuple[fx.Graph, list[fx.Node] | None, list[fx.Node] | None]]:
    """Split the indexed graph after each position: ``(graph, crossing-in, crossing-out)`` per piece.

    Piece k holds the nodes in ``(positions[k-1], positions[k]]`` in their original
    order (so in-place ops keep their order); ``get_attr`` nodes are re-created in
    every piece that reads them. The first piece keeps the graph's way of taking its
    inputs and the last its way of returning outputs. What crosses each cut is its
    :func:`~surgery.pieces.boundary.boundary` (``firsts[k]`` leading; default: the cut node):
    constants and sizes a crossing tensor holds stay inside the pieces.
    """
    nodes = index.nodes
    bounds = [-1, *positions, index.output_position]
    cuts = [boundary(index, p, firsts[i] if firsts else (nodes[p],)) for i, p in enumerate(positions)]
    fixed = {n: v for b in cuts for n, v in b.constants.items() if n.op == "placeholder"}
    out: list[tuple[fx.Graph, list[fx.Node] | None, list[fx.Node] | None]] = []
    for k in range(len(bounds) - 1):
        ins = cuts[k - 1].values if k > 0 else None
        outs = cuts[k].values if k < len(positions) else None
        g = fx.Graph()
        g._codegen = _codegen(index.graph._codegen, k == 0, k == len(bounds) - 2)
        env: dict[fx.Node, Any] = receive(g, cuts[k - 1]) if k > 0 else {}

        def arg(a: fx.Node, g: fx.Graph = g, env: dict[fx.Node, Any] = env) -> Any:
            if a not in env:  # a parameter or constant read in this piece
                env[a] = g.get_attr(str(a.target))  # a get_attr node: its target is the attribute's path
            return env[a]

        for n in nodes[bounds[k] + 1 : bounds[k + 1] + 1]:
            if n.op != "get_attr":
                new = g.create_node(n.op, n.target, fx.map_arg(n.args, arg), fx.map_arg(n.kwargs, arg), n.name, n.type)
                new.meta = dict(n.meta)
                env[n] = new
        if k == 0:
            guard_defaults(g, {env[n]: v for n, v in fixed.items()})
        if outs is not None:
            g.output(env[outs[0]] if len(outs) == 1 else tuple(env[v] for v in outs))
        out.append((g, ins, outs))
    return out
