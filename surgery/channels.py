"""Which channels of a traced network are coupled, so they can be permuted or replicated together.

A *channel space* is one dimension of one fx node's output (dim 1 of a conv's
NCHW output, the last dim of a Linear's output). Spaces are coupled when changing
the channels of one forces the same change on the other: a residual addition, an
SE ``x * scale``, a BatchNorm or depthwise conv passing the channels through, a
concatenation placing them at an offset of a wider tensor, a flatten turning each
channel into H*W features of a Linear's input. :func:`analyze_channels` walks the
graph once and returns every coupled :class:`ChannelGroup`: the layers whose
outputs write the channels (*producers*), the per-channel parameters that follow
them (*followers*: BatchNorm, depthwise convs, ConvNeXt's layer scale) and the
layers that read them (*consumers*), plus the reasons a change would not be exact.

>>> import torchvision
>>> from surgery.channels import analyze_channels
>>> a = analyze_channels(torchvision.models.resnet18())
>>> g = a.group_at("layer2.0.conv2")
>>> [p.target for p in g.producers]
['layer2.0.conv2', 'layer2.0.downsample.0', 'layer2.1.conv2']
>>> [c.target for c in g.consumers]
['layer2.1.conv1', 'layer3.0.conv1', 'layer3.0.downsample.0']
>>> a.group_at("fc").obstacle(replicate=True)
"reaches the model output (node 'output')"

The analysis only reads the graph and the shapes of a meta-device run (no
arithmetic): the weight edits that use it live in :mod:`surgery.permute` and
:mod:`growth`.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call
from torchvision.ops import StochasticDepth, stochastic_depth

from surgery._util import first_line
from surgery.errors import SurgeryError
from surgery.names import GraphIndex
from surgery.tracing import trace

# ----------------------------------------------------------------------------- shapes

_SHAPE_KEEPING_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.PReLU,
    StochasticDepth,
)
_CANDIDATE_SIZES = (64, 32, 96, 224, 299)


@dataclass(frozen=True)
class Shapes:
    """Output shape and dtype of every tensor-valued node (others map to None), and the input used."""

    input_shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    of: dict[str, tuple[int, ...] | None]

    def example_inputs(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Random real inputs of the shapes that ran (standard normal, the model's dtype)."""
        return tuple(torch.randn(s, generator=generator, dtype=self.dtype) for s in self.input_shapes)


class _MetaRun(fx.Interpreter):
    """Runs a graph on meta tensors: every shape, no arithmetic, parameters never copied."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...] | None] = {}

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, _SHAPE_KEEPING_MODULES) and args and isinstance(args[0], torch.Tensor):
            return args[0]
        state = {k: v.to("meta") for k, v in module.state_dict(keep_vars=True).items()}
        return functional_call(module, state, args, kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n.name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def _model_dtype(gm: nn.Module) -> torch.dtype:
    return next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)


def _candidate_inputs(gm: fx.GraphModule) -> list[tuple[tuple[int, ...], ...]]:
    """Input shapes to try: the first layer's input size decides between images and vectors."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next((u for p in placeholders[:1] for u in p.users if u.op == "call_module"), None)
    layer = gm.get_submodule(str(first.target)) if first is not None else None
    if isinstance(layer, nn.Linear):
        return [tuple((2, layer.in_features) for _ in placeholders)]
    channels = layer.in_channels if isinstance(layer, nn.Conv2d) else 3
    return [tuple((2, channels, s, s) for _ in placeholders) for s in _CANDIDATE_SIZES]


@torch.no_grad()
def infer_shapes(gm: fx.GraphModule, example_input: Any = None) -> Shapes:
    """Shapes of every node from a meta-device run on ``example_input`` (shapes only are used).

    Without an example, tries 2x3xSxS images for S in 64, 32, 96, 224, 299 (a Linear
    first layer gets a 2xF vector) and keeps the first that runs.
    """
    dtype = _model_dtype(gm)
    if example_input is not None:
        given = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
        candidates = [tuple(tuple(x.shape) for x in given)]
    else:
        candidates = _candidate_inputs(gm)
    failure = ""
    for shapes in candidates:
        run = _MetaRun(gm)
        try:
            run.run(*(torch.empty(s, dtype=dtype, device="meta") for s in shapes))
        except Exception as e:  # noqa: BLE001 - any failure means "not this input size"
            failure = first_line(e)
            continue
        return Shapes(shapes, dtype, run.shapes)
    tried = "; ".join("x".join(map(str, s[0])) for s in candidates)
    raise SurgeryError(
        f"cannot run {type(gm).__name__} on an input of shape {tried} ({failure}); pass example_input= a tensor the model accepts"
    )


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """``'layer1.0.bn2' (BatchNorm2d)``, ``'add_3' (add)``, ``'cat'``: a node as error messages name it."""
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(str(node.target))).__name__})"
    what = f".{node.target}()" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}'" if node.name.rstrip("_0123456789") == what else f"'{node.name}' ({what})"


# ----------------------------------------------------------------------------- results


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
    ``get_attr``); ``space`` names the node whose output layout indexes them (the input
    of a consumer, the output otherwise); ``dim`` is the dim of a parameter tensor that
    carries the channels; ``groups`` the conv groups of a consumer.
    """

    node: str
    target: str
    kind: str
    space: str
    dim: int = 0
    groups: int = 1


@dataclass
class ChannelGroup:
    """Channels that must change together, with every weight that touches them."""

    id: int
    channels: int
    blocks: int = 1
    producers: list[Endpoint] = field(default_factory=list)
    followers: list[Endpoint] = field(default_factory=list)
    consumers: list[Endpoint] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    replication_blockers: list[str] = field(default_factory=list)

    def obstacle(self, replicate: bool) -> str | None:
        """Why the channels cannot be permuted (or, with ``replicate``, replicated/added) exactly; None if they can.

        ``blocks`` > 1 is not an obstacle: grouped convs only ask that channels move within
        each of ``blocks`` equal contiguous blocks.
        """
        reasons = self.blockers + (self.replication_blockers if replicate else [])
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
                f"the output of '{name}' joins several channel groups ({parts}); name one of the layers that feed it"
            )
        return self.groups[layout.segments[0].group]

    def producer_groups(self) -> list[tuple[Endpoint, ChannelGroup]]:
        """Every producer with its group, in graph order."""
        pairs = [(p, g) for g in self.groups.values() for p in g.producers]
        order = {n.name: i for i, n in enumerate(self.graph.nodes)}
        return sorted(pairs, key=lambda pg: order[pg[0].node])


# ----------------------------------------------------------------------------- the walk


class _Walk:
    """One forward pass over the graph assigning layouts; groups merge in a union-find."""

    def __init__(self, gm: fx.GraphModule, shapes: Shapes):
        self.gm = gm
        self.shapes = shapes
        self.modules = dict(gm.named_modules())
        self.layouts: dict[fx.Node, Layout] = {}
        self.parent: list[int] = []
        self.drafts: list[ChannelGroup] = []  # per group id; merged into the root's by union
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
        for name in ("producers", "followers", "consumers", "nodes", "blockers", "replication_blockers"):
            getattr(da, name).extend(getattr(db, name))

    def block(self, layouts: Iterable[Layout | None], reason: str, replication_only: bool = False) -> None:
        for layout in layouts:
            for g in layout.groups() if layout is not None else ():
                d = self.draft(g)
                (d.replication_blockers if replication_only else d.blockers).append(reason)

    def couple(self, layouts: list[Layout], node: fx.Node, verb: str) -> bool:
        """Join the groups of ``layouts`` position by position (they hold the same channels); False if laid out differently."""
        first = layouts[0]
        structure = [(s.channels, s.inner) for s in first.segments]
        if any([(s.channels, s.inner) for s in other.segments] != structure for other in layouts[1:]):
            self.block(layouts, f"{self.describe(node)} {verb} channels laid out differently")
            return False
        for other in layouts[1:]:
            for a, b in zip(first.segments, other.segments):
                self.union(a.group, b.group)
        return True

    def add(self, layout: Layout, role: str, endpoint: Endpoint) -> None:
        for g in layout.groups():
            getattr(self.draft(g), role).append(endpoint)

    # node helpers
    def layout(self, arg: Any) -> Layout | None:
        return self.layouts.get(arg) if isinstance(arg, fx.Node) else None

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        return self.shapes.of.get(arg.name) if isinstance(arg, fx.Node) else None

    def describe(self, node: fx.Node) -> str:
        return describe_node(self.gm, node)

    def tracked_inputs(self, node: fx.Node) -> list[Layout]:
        found: list[Layout] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(self.layouts[a]) if a in self.layouts else a)
        return found

    def not_followed(self, node: fx.Node) -> None:
        self.block(self.tracked_inputs(node), f"{self.describe(node)} does something to them the channel analysis does not follow")

    # the pass
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            out = self.visit(node)
            if out is not None:
                self.layouts[node] = out
                for g in out.groups():
                    self.draft(g).nodes.append(node.name)
            if node.op == "call_module" and self.calls[str(node.target)] > 1 and any(
                True for _ in self.modules[str(node.target)].parameters()
            ):
                self.block([out, *self.tracked_inputs(node)], f"{self.describe(node)} is called {self.calls[str(node.target)]} times with shared weights")

    def visit(self, node: fx.Node) -> Layout | None:
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
            rule = next((r for cls in type(module).__mro__ if (r := _MODULE_RULES.get(cls)) is not None), None)
            return rule(self, node, module) if rule else _fallback(self, node)
        rule = (_METHOD_RULES if node.op == "call_method" else _FUNCTION_RULES).get(node.target)
        return rule(self, node) if rule else _fallback(self, node)

    def finish(self) -> dict[int, ChannelGroup]:
        """The root groups, their lists in graph order and their reasons without repeats."""
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        groups = {g: self.drafts[g] for g in range(len(self.parent)) if self.find(g) == g}
        for grp in groups.values():
            for endpoints in (grp.producers, grp.followers, grp.consumers):
                endpoints.sort(key=lambda ep: order[ep.node])
            grp.nodes.sort(key=order.__getitem__)
            grp.blockers[:] = dict.fromkeys(grp.blockers)
            grp.replication_blockers[:] = dict.fromkeys(grp.replication_blockers)
            if grp.channels % grp.blocks:
                grp.blockers.append(f"{grp.channels} channels cannot split into the {grp.blocks} blocks of the grouped convs reading them")
        return groups

    def rooted(self, layout: Layout) -> Layout:
        return Layout(layout.dim, tuple(Segment(self.find(s.group), s.channels, s.inner) for s in layout.segments))


def analyze_channels(model: nn.Module, example_input: Any = None) -> ChannelAnalysis:
    """Analyse which channels of ``model`` are coupled (traces it unless it is a GraphModule).

    Args:
        model: any fx-traceable module or a GraphModule.
        example_input: an input tensor (or a tuple of them) that fixes the shapes; by
            default the first of a few image sizes that runs.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    shapes = infer_shapes(gm, example_input)
    walk = _Walk(gm, shapes)
    walk.run()
    groups = walk.finish()
    layouts = {n.name: walk.rooted(layout) for n, layout in walk.layouts.items()}
    return ChannelAnalysis(gm.graph, shapes, layouts, groups)


# ----------------------------------------------------------------------------- rules

ModuleRule = Callable[[_Walk, fx.Node, Any], "Layout | None"]
NodeRule = Callable[[_Walk, fx.Node], "Layout | None"]
_MODULE_RULES: dict[type, ModuleRule] = {}
_FUNCTION_RULES: dict[Any, NodeRule] = {}
_METHOD_RULES: dict[str, NodeRule] = {}


def _register(table: dict[Any, Any], keys: Iterable[Any]) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        for k in keys:
            table[k] = fn
        return fn

    return deco


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _dims_arg(node: fx.Node, start: int) -> list[Any]:
    """``x.permute(0, 2, 1)`` and ``x.permute([0, 2, 1])`` alike: the dims given from position ``start``."""
    rest = list(node.args[start:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    if not rest:
        for key in ("dims", "shape", "size"):
            if key in node.kwargs:
                return list(node.kwargs[key])
    return rest


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# --- modules

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.modules.dropout._DropoutNd, nn.Identity, StochasticDepth,
)


@_register(_MODULE_RULES, _ELEMENTWISE_MODULES)
def _pass_module(w: _Walk, node: fx.Node, module: nn.Module) -> Layout | None:
    return w.layout(node.args[0]) if node.args else None


@_register(_MODULE_RULES, [nn.Conv2d])
def _conv(w: _Walk, node: fx.Node, conv: nn.Conv2d) -> Layout | None:
    x = node.args[0]
    layout = w.layout(x)
    shape = w.shape(x)
    if layout is not None and (layout.dim != 1 or shape is None or len(shape) != 4):
        w.block([layout], f"{w.describe(node)} reads dim 1 but these channels are on dim {layout.dim}")
        layout = None
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if depthwise:
        if layout is not None:
            w.add(layout, "followers", Endpoint(node.name, str(node.target), "Conv2d", node.name))
        return layout
    if layout is not None:
        if conv.groups > 1:
            if len(layout.segments) == 1 and layout.segments[0].inner == 1:
                d = w.draft(layout.segments[0].group)
                d.blocks = math.lcm(d.blocks, conv.groups)
            else:
                w.block([layout], f"grouped conv {w.describe(node)} reads a concatenation")
        w.add(layout, "consumers", Endpoint(node.name, str(node.target), "Conv2d", x.name, groups=conv.groups))
    out = Layout(1, (Segment(w.new_group(conv.out_channels, conv.groups), conv.out_channels),))
    w.add(out, "producers", Endpoint(node.name, str(node.target), "Conv2d", node.name, groups=conv.groups))
    return out


@_register(_MODULE_RULES, [nn.Linear])
def _linear(w: _Walk, node: fx.Node, linear: nn.Linear) -> Layout | None:
    x = node.args[0]
    layout = w.layout(x)
    ndim = len(w.shape(x) or (0, 0))
    if layout is not None and layout.dim != ndim - 1:
        w.block([layout], f"{w.describe(node)} mixes dim {ndim - 1} but these channels are on dim {layout.dim}")
        layout = None
    if layout is not None:
        w.add(layout, "consumers", Endpoint(node.name, str(node.target), "Linear", x.name))
    out = Layout(ndim - 1, (Segment(w.new_group(linear.out_features), linear.out_features),))
    w.add(out, "producers", Endpoint(node.name, str(node.target), "Linear", node.name))
    return out


@_register(_MODULE_RULES, [nn.modules.batchnorm._BatchNorm])
def _batchnorm(w: _Walk, node: fx.Node, bn: nn.Module) -> Layout | None:
    layout = w.layout(node.args[0])
    if layout is None:
        return None
    if layout.dim != 1:
        w.block([layout], f"{w.describe(node)} normalises dim 1 but these channels are on dim {layout.dim}")
        return None
    w.add(layout, "followers", Endpoint(node.name, str(node.target), type(bn).__name__, node.name))
    return layout


@_register(_MODULE_RULES, [nn.PReLU])
def _prelu(w: _Walk, node: fx.Node, prelu: nn.PReLU) -> Layout | None:
    layout = w.layout(node.args[0])
    if layout is not None and prelu.num_parameters > 1:
        if layout.dim != 1:
            w.block([layout], f"{w.describe(node)} has one slope per dim-1 channel but these channels are on dim {layout.dim}")
            return None
        w.add(layout, "followers", Endpoint(node.name, str(node.target), "PReLU", node.name))
    return layout


def _normalised_over(w: _Walk, node: fx.Node, normalized_ndim: int, params: Sequence[tuple[str, str]]) -> Layout | None:
    """Layer norms: channels in the normalised dims cannot be replicated (statistics change) but can be permuted."""
    x = node.args[0]
    layout = w.layout(x)
    ndim = len(w.shape(x) or ())
    if layout is None or layout.dim < ndim - normalized_ndim:
        return layout
    w.block([layout], f"{w.describe(node)} normalises over these channels: replicating them changes its statistics", replication_only=True)
    for target, kind in params:
        w.add(layout, "followers", Endpoint(node.name, target, kind, node.name, dim=layout.dim - (ndim - normalized_ndim)))
    return layout


@_register(_MODULE_RULES, [nn.LayerNorm])
def _layernorm_module(w: _Walk, node: fx.Node, ln: nn.LayerNorm) -> Layout | None:
    params = [(str(node.target), "LayerNorm")] if ln.elementwise_affine else []
    return _normalised_over(w, node, len(ln.normalized_shape), params)


@_register(_FUNCTION_RULES, [F.layer_norm])
def _layernorm_function(w: _Walk, node: fx.Node) -> Layout | None:
    normalized = _arg(node, 1, "normalized_shape")
    params = []
    for pos, name in ((2, "weight"), (3, "bias")):
        p = _arg(node, pos, name)
        if isinstance(p, fx.Node):
            if p.op != "get_attr":
                w.block([w.layout(node.args[0])], f"{w.describe(node)} takes a computed {name}")
                continue
            params.append((str(p.target), "parameter"))
    return _normalised_over(w, node, len(normalized), params)


def _spatial(w: _Walk, node: fx.Node) -> Layout | None:
    """Pooling and resizing act on the last two dims; channels elsewhere pass through."""
    x = node.args[0]
    layout = w.layout(x)
    ndim = len(w.shape(x) or ())
    if layout is not None and layout.dim >= ndim - 2:
        w.block([layout], f"{w.describe(node)} pools over the dim that carries these channels")
        return None
    return layout


_register(_FUNCTION_RULES, [F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.interpolate])(_spatial)


@_register(_MODULE_RULES, [nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample])
def _spatial_module(w: _Walk, node: fx.Node, module: nn.Module) -> Layout | None:
    return _spatial(w, node)


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


@_register(_FUNCTION_RULES, [torch.flatten])
@_register(_METHOD_RULES, ["flatten"])
def _flatten(w: _Walk, node: fx.Node) -> Layout | None:
    return _flatten_dims(w, node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))


def _softmax_like(w: _Walk, node: fx.Node, dim: int | None) -> Layout | None:
    x = node.args[0]
    layout = w.layout(x)
    if layout is not None and (dim is None or _norm(dim, len(w.shape(x) or ())) == layout.dim):
        w.block([layout], f"{w.describe(node)} normalises over these channels")
        return None
    return layout


@_register(_MODULE_RULES, [nn.Softmax])
def _softmax_module(w: _Walk, node: fx.Node, module: nn.Softmax) -> Layout | None:
    return _softmax_like(w, node, module.dim)


@_register(_FUNCTION_RULES, [F.softmax, torch.softmax])
@_register(_METHOD_RULES, ["softmax"])
def _softmax(w: _Walk, node: fx.Node) -> Layout | None:
    return _softmax_like(w, node, _arg(node, 1, "dim"))


# --- elementwise functions and methods

_UNARY_FUNCTIONS = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
    torch.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh, F.dropout,
    F.dropout2d, operator.neg, torch.neg, torch.abs, stochastic_depth,
]
_UNARY_METHODS = ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "detach", "float", "double", "to", "type_as", "neg", "abs"]


@_register(_FUNCTION_RULES, _UNARY_FUNCTIONS)
@_register(_METHOD_RULES, _UNARY_METHODS)
def _unary(w: _Walk, node: fx.Node) -> Layout | None:
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node) and a in w.layouts]
    if others:
        return _fallback(w, node)
    return w.layout(node.args[0])


def _fallback(w: _Walk, node: fx.Node) -> None:
    w.not_followed(node)
    return None


_BINARY_FUNCTIONS = [
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
]
_BINARY_METHODS = ["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"]


@_register(_FUNCTION_RULES, _BINARY_FUNCTIONS)
@_register(_METHOD_RULES, _BINARY_METHODS)
def _binary(w: _Walk, node: fx.Node) -> Layout | None:
    """Broadcasting elementwise ops: same-size tracked operands couple their groups."""
    out_shape = w.shape(node)
    if out_shape is None:
        return None
    ndim = len(out_shape)
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and w.shape(a) is not None]
    tracked = [(a, w.layouts[a]) for a in operands if a in w.layouts]
    if not tracked:
        return None
    aligned = {a: w.layouts[a].dim + ndim - len(w.shape(a)) for a, _ in tracked}
    full = [(a, lay) for a, lay in tracked if w.shape(a)[lay.dim] == out_shape[aligned[a]] and lay.size > 1]
    for a, lay in tracked:
        if (a, lay) not in full:
            w.block([lay], f"{w.describe(node)} broadcasts these channels against a wider dim")
    if not full:
        return None
    dims = {aligned[a] for a, _ in full}
    layouts = [lay for _, lay in full]
    if len(dims) > 1:
        w.block(layouts, f"{w.describe(node)} combines channels that sit on different dims")
        return None
    if not w.couple(layouts, node, "combines"):
        return None
    out = layouts[0].at(dims.pop())
    for a in operands:
        if a in w.layouts:
            continue
        shape = w.shape(a)
        own = out.dim - (ndim - len(shape))
        if own < 0 or shape[own] == 1:
            continue
        if a.op == "get_attr":
            w.add(out, "followers", Endpoint(node.name, str(a.target), "parameter", node.name, dim=own))
        else:
            w.block([out], f"{w.describe(node)} combines them with '{a.name}', a value the channel analysis does not follow")
    return out


@_register(_FUNCTION_RULES, [torch.cat, torch.concat, torch.concatenate])
def _cat(w: _Walk, node: fx.Node) -> Layout | None:
    tensors = list(_arg(node, 0, "tensors"))
    out_shape = w.shape(node)
    if out_shape is None:
        return None
    dim = _norm(_arg(node, 1, "dim", 0), len(out_shape))
    layouts = [w.layout(t) for t in tensors]
    if any(lay is not None and lay.dim != dim for lay in layouts):
        return _cat_aside(w, node, tensors, layouts, dim)
    segments: list[Segment] = []
    for t, lay in zip(tensors, layouts):
        if lay is None:
            size = w.shape(t)[dim]
            unknown = w.new_group(size)
            w.draft(unknown).blockers.append(f"'{t.name}' enters concatenation {w.describe(node)} untracked")
            segments.append(Segment(unknown, size))
        else:
            segments.extend(lay.segments)
    return Layout(dim, tuple(segments))


def _cat_aside(w: _Walk, node: fx.Node, tensors: list[Any], layouts: list[Layout | None], dim: int) -> Layout | None:
    """Concatenation along another dim (tokens, say): every input carries the same channels."""
    present = [lay for lay in layouts if lay is not None]
    if any(lay is None or lay.dim == dim for lay in layouts) or len({lay.dim for lay in present}) > 1:
        w.block(present, f"{w.describe(node)} concatenates these channels with values the channel analysis does not follow")
        return None
    return present[0] if w.couple(present, node, "concatenates") else None


def _moved(w: _Walk, node: fx.Node, where: Callable[[int, int], int]) -> Layout | None:
    """Dim-moving ops: the channels go to ``where(old_dim, ndim)``."""
    layout = w.layout(node.args[0])
    return None if layout is None else layout.at(where(layout.dim, len(w.shape(node.args[0]))))


@_register(_FUNCTION_RULES, [torch.permute])
@_register(_METHOD_RULES, ["permute"])
def _permute(w: _Walk, node: fx.Node) -> Layout | None:
    return _moved(w, node, lambda dim, ndim: [_norm(d, ndim) for d in _dims_arg(node, 1)].index(dim))


@_register(_FUNCTION_RULES, [torch.transpose, torch.swapaxes, torch.swapdims])
@_register(_METHOD_RULES, ["transpose", "swapaxes", "swapdims"])
def _transpose(w: _Walk, node: fx.Node) -> Layout | None:
    def swapped(dim: int, ndim: int) -> int:
        a, b = _norm(node.args[1], ndim), _norm(node.args[2], ndim)
        return {a: b, b: a}.get(dim, dim)

    return _moved(w, node, swapped)


@_register(_FUNCTION_RULES, [torch.unsqueeze])
@_register(_METHOD_RULES, ["unsqueeze"])
def _unsqueeze(w: _Walk, node: fx.Node) -> Layout | None:
    layout = w.layout(node.args[0])
    if layout is None:
        return None
    d = _norm(_arg(node, 1, "dim"), len(w.shape(node)))
    return layout.at(layout.dim + (1 if d <= layout.dim else 0))


@_register(_FUNCTION_RULES, [torch.mean, torch.sum, torch.amax, torch.amin])
@_register(_METHOD_RULES, ["mean", "sum", "amax", "amin"])
def _reduce(w: _Walk, node: fx.Node) -> Layout | None:
    x = node.args[0]
    layout = w.layout(x)
    if layout is None:
        return None
    ndim = len(w.shape(x))
    dims = _arg(node, 1, "dim")
    if dims is None:
        w.block([layout], f"{w.describe(node)} reduces over these channels")
        return None
    dims = [_norm(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if layout.dim in dims:
        w.block([layout], f"{w.describe(node)} reduces over these channels")
        return None
    keep = _arg(node, 2, "keepdim", False)
    return layout.at(layout.dim - (0 if keep else sum(d < layout.dim for d in dims)))


@_register(_FUNCTION_RULES, [torch.reshape])
@_register(_METHOD_RULES, ["reshape", "view"])
def _reshape(w: _Walk, node: fx.Node) -> Layout | None:
    """Reshapes keep the channels when the dims before them keep their product and the channel dim survives (or leads a merge)."""
    x = node.args[0]
    layout = w.layout(x)
    if layout is None:
        return None
    before, after = w.shape(x), w.shape(node)
    lead = math.prod(before[: layout.dim])
    for d in range(len(after)):
        if math.prod(after[:d]) != lead:
            continue
        if after[d] == before[layout.dim] and math.prod(after[d + 1 :]) == math.prod(before[layout.dim + 1 :]):
            _literal_channel_count(w, node, layout, d)
            return layout.at(d)
        merged = [e for e in range(layout.dim + 2, len(before) + 1) if math.prod(before[layout.dim : e]) == after[d]]
        if merged:
            _literal_channel_count(w, node, layout, d)
            inner = math.prod(before[layout.dim + 1 : merged[0]])
            return Layout(d, tuple(Segment(s.group, s.channels, s.inner * inner) for s in layout.segments))
    w.block([layout], f"{w.describe(node)} splits these channels or merges them into a preceding dim")
    return None


def _literal_channel_count(w: _Walk, node: fx.Node, layout: Layout, d: int) -> None:
    """A reshape that spells the channel count as a number stops fitting once the width changes."""
    sizes = _dims_arg(node, 1)
    if d < len(sizes) and isinstance(sizes[d], int) and sizes[d] != -1:
        w.block([layout], f"{w.describe(node)} reshapes to a fixed count of {sizes[d]} channels", replication_only=True)


@_register(_FUNCTION_RULES, [operator.getitem])
def _getitem(w: _Walk, node: fx.Node) -> Layout | None:
    """Basic indexing of a tensor (``x[:, 0]``): the channel dim must be taken whole."""
    x, index = node.args
    layout = w.layout(x)
    if layout is None:
        return None
    ndim = len(w.shape(x))
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
        return _fallback(w, node)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        used = sum(i is not None for i in items) - 1
        items[k : k + 1] = [slice(None)] * (ndim - used)
    src = out = 0
    for item in items + [slice(None)] * (ndim - sum(i is not None for i in items)):
        if item is None:
            out += 1
            continue
        if src == layout.dim:
            if item != slice(None):
                w.block([layout], f"{w.describe(node)} selects some of these channels")
                return None
            return layout.at(out)
        src += 1
        out += 0 if isinstance(item, int) else 1
    return None


@_register(_FUNCTION_RULES, [getattr])
@_register(_METHOD_RULES, ["size", "dim"])
def _size_read(w: _Walk, node: fx.Node) -> None:
    """Reading a tensor's shape, dtype or device is harmless."""
    attribute = node.args[1] if node.op == "call_function" and len(node.args) > 1 else "shape"
    if attribute not in ("shape", "dtype", "device", "ndim"):
        return _fallback(w, node)
    return None
