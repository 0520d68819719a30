"""Slimmable views of any traced network: one set of weights run at any width (US-Nets, MutualNet).

Slimmable networks are usually written layer by layer by hand. Here the channel
analysis (:mod:`surgery.channels`) already knows every coupled group of channels, so any
network it follows can be slimmed as it is: at width ``w`` every group whose size may
change keeps its first ``make_divisible(w * C)`` channels (within each block of grouped
convs; depthwise convs follow their channels), and every layer touching it takes the
matching rows and columns of the *shared* weights. The model's input and output are
never slimmed; groups whose size is fixed (a reshape spelling it out, attention heads)
stay at full width and are listed in :attr:`SlimNet.skipped` with the reason.

>>> import torch, torchvision, surgery
>>> net = torchvision.models.resnet18(num_classes=10).eval()
>>> slim = surgery.slim(net, 0.5)
>>> x = torch.randn(2, 3, 32, 32)
>>> small = slim.extract()                    # a plain network with copies of the kept weights
>>> small.layer2[0].conv1.out_channels, small.fc.in_features, small.fc.out_features
(64, 256, 10)
>>> torch.equal(slim(x), small(x))
True
>>> slim.width = 1.0
>>> torch.equal(slim(x), net(x))
True

Width is a setting of the view, not a copy: ``slim.model`` *is* the traced model (it
shares ``net``'s parameters), and a forward pass at any width gathers the kept
entries of those parameters, so a training step at one width trains the shared
weights. BatchNorm statistics differ per width and input resolution:
:meth:`SlimNet.recalibrate_bn` (or :func:`surgery.recalibrate_bn`) estimates them for the
current width at the resolution of the batches it is given, and the view uses them
whenever it runs at that width and resolution (an extracted network carries them).
Without calibration a narrow width uses the full network's statistics, sliced.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call

from surgery.channels import ChannelAnalysis, ChannelGroup, analyze_channels
from surgery.channels.batchnorm import recalibrate_bn
from surgery.channels.layouts import find_layout
from surgery.channels.rebuild import as_own_class
from surgery.channels.remap import ChannelMap, remap_channels
from surgery.core.errors import SurgeryError
from surgery.core.recipe import extend_recipe, register_replay
from surgery.core.util import first_line
from surgery.graph.capture import trace

Resolution = tuple[int, ...]


def make_divisible(value: float, divisor: int) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least one), never more than 10 % below it
    (MobileNet's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def kept_channels(channels: int, width: float, divisor: int = 8, blocks: int = 1) -> int:
    """How many of a group's ``channels`` width ``width`` keeps: a multiple of ``divisor`` (where ``channels`` is)
    and of ``blocks`` (grouped convs reading them, attention heads sharing them), at least one block, at most all."""
    if width >= 1.0:
        return channels
    unit = math.lcm(divisor, blocks)
    if channels % unit or unit > max(divisor, blocks):  # rounding to both would be too coarse: keep the blocks
        unit = blocks
    return min(channels, make_divisible(width * channels, unit))


def _unit(group: ChannelGroup) -> int:
    """What a group's kept count must be a multiple of: its blocks and its heads."""
    return math.lcm(group.blocks, group.multiple)


def keep_map(group: ChannelGroup, kept: int) -> ChannelMap:
    """The first ``kept / blocks`` channels of each of the group's blocks."""
    per, keep = group.channels // group.blocks, kept // group.blocks
    index = (torch.arange(keep) + (torch.arange(group.blocks) * per)[:, None]).flatten()
    return ChannelMap(index, group.channels)


def check_width(width: float) -> float:
    width = float(width)
    if not 0.0 < width <= 1.0:
        raise SurgeryError(f"width {width:g} is outside (0, 1]; give a fraction of the full width such as 0.5")
    return width


# Where a kept tensor comes from in the full tensor of the same name: the kept positions along each dim (None:
# all of them), or, for a selection that is not one per dim, flat positions.
Selection = list[torch.Tensor | None] | torch.Tensor
MAX_PLANS = 256  # plans kept at once (one per distinct set of kept channel counts); the oldest go first


@dataclass
class _Plan:
    """The network at one width: a module tree without tensors, and where each of its tensors comes from."""

    maps: dict[int, ChannelMap]
    skeleton: fx.GraphModule  # every parameter and buffer removed; supplied at call time
    index: dict[str, Selection]
    shapes: dict[str, torch.Size]


def _selection(flat: torch.Tensor, full: torch.Size, kept: torch.Size) -> Selection:
    """``flat`` (positions in a tensor of shape ``full``, laid out as ``kept``) as one index per dim when it is."""
    if len(full) == 0:  # a scalar (a BatchNorm's batch count): kept as it is
        return []
    if len(full) != len(kept):
        return flat
    coords = torch.unravel_index(flat, full)
    per_dim: list[torch.Tensor | None] = []
    for d, c in enumerate(coords):
        line = c.view(kept)[(0,) * d + (slice(None),) + (0,) * (len(full) - d - 1)]  # dim d, others at 0
        identity = len(line) == full[d] and torch.equal(line, torch.arange(full[d]))
        per_dim.append(None if identity else line.clone())
    rebuilt = torch.zeros((), dtype=torch.long)
    for d, idx in enumerate(per_dim):
        positions = torch.arange(full[d]) if idx is None else idx
        rebuilt = rebuilt * full[d] + positions.view([-1] + [1] * (len(full) - d - 1))
    return per_dim if torch.equal(rebuilt.flatten(), flat) else flat


def _gather(full: torch.Tensor, selection: Selection, shape: torch.Size) -> torch.Tensor:
    """The kept entries of ``full`` (a view of it when nothing is dropped; otherwise a gather autograd follows)."""
    if isinstance(selection, torch.Tensor):
        return full.reshape(-1)[selection.to(full.device)].view(shape)
    out = full
    for d, idx in enumerate(selection):
        if idx is not None:
            out = out.index_select(d, idx.to(full.device))
    return out


def _tensors(module: nn.Module) -> Iterable[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owner, attribute, full name, tensor) of every parameter and buffer, tied ones under each name."""
    for path, owner in module.named_modules(remove_duplicate=False):
        for table in (owner._parameters, owner._buffers):
            for attr, t in table.items():
                if t is not None:
                    yield owner, attr, f"{path}.{attr}" if path else attr, t


class SlimNet(nn.Module):
    """A traced model run at a settable ``width`` with one shared set of weights (see the module docstring).

    Args:
        model: any module the channel analysis follows; its parameters are shared, not copied.
        width: the initial width, in (0, 1].
        divisor: kept channel counts are multiples of this where the group's size is (8, as
            MobileNet's ``make_divisible``; 1 keeps exactly ``round(width * C)``).
        example_input: an input fixing the shapes for the analysis (default: a small image).

    >>> import torch, surgery
    >>> net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32).eval()
    >>> view, x = surgery.SlimNet(net, width=1.0), torch.randn(2, 3, 32, 32)
    >>> torch.equal(view(x), net(x))  # at full width it is the model
    True
    >>> view.width = 0.5  # the same weights, half the channels
    >>> view(x).shape
    torch.Size([2, 10])
    """

    def __init__(self, model: nn.Module, width: float = 1.0, divisor: int = 8, *, example_input: Any = None):
        super().__init__()
        if divisor < 1:
            raise SurgeryError(f"divisor={divisor}; give a positive channel multiple (8, or 1 for none)")
        self.model = model if isinstance(model, fx.GraphModule) else trace(model, example_input=example_input)
        self._like = [model] if find_layout(model) is not None else []  # a family whose class extract() rebuilds
        self.divisor = divisor
        self._analysis: ChannelAnalysis = analyze_channels(self.model, example_input)
        self.groups: dict[int, ChannelGroup] = {}
        self.skipped: list[str] = []
        for gid, group in self._analysis.groups.items():
            reason = group.resize_obstacle()
            if reason is None:
                self.groups[gid] = group
            elif group.producers:
                self.skipped.append(f"'{group.producers[0].target}' ({group.channels} channels): {reason}")
        self._plans: dict[tuple[tuple[int, int], ...], _Plan] = {}
        self._drop_unrunnable()
        if not self.groups:
            first = f" ({self.skipped[0]})" if self.skipped else ""
            raise SurgeryError(
                f"{type(model).__name__} has no channel group whose width can change{first}; nothing to slim"
            )
        self.bn_stats: dict[tuple[float, Resolution], dict[str, torch.Tensor]] = {}
        self.width = width

    # --- width ---------------------------------------------------------------------------------

    @property
    def width(self) -> float:
        return self._width

    @width.setter
    def width(self, value: float) -> None:
        self._width = check_width(value)

    def channels(self, width: float | None = None) -> dict[str, int]:
        """Kept channels of each slimmable group at ``width`` (default: the current), named by its first producer."""
        w = self.width if width is None else check_width(width)
        return {
            g.producers[0].target: kept_channels(g.channels, w, self.divisor, _unit(g))
            for g in self.groups.values()
            if g.producers
        }

    def _plan(self, width: float) -> _Plan | None:
        """The plan at ``width``; None when it keeps every channel (the model itself runs)."""
        maps = {}
        for gid, group in self.groups.items():
            kept = kept_channels(group.channels, width, self.divisor, _unit(group))
            if kept < group.channels:
                maps[gid] = keep_map(group, kept)
        if not maps:
            return None
        key = tuple((gid, m.size) for gid, m in maps.items())
        if key not in self._plans:
            if len(self._plans) >= MAX_PLANS:
                del self._plans[next(iter(self._plans))]
            self._plans[key] = self._build_plan(maps)
        return self._plans[key]

    def _build_plan(self, maps: dict[int, ChannelMap]) -> _Plan:
        """Apply ``maps`` to a copy whose tensors hold their own flat positions: what each kept entry was."""
        probe = copy.deepcopy(self.model)
        with torch.no_grad():
            for owner, attr, _, t in list(_tensors(probe)):
                positions = torch.arange(t.numel(), dtype=torch.float64).view(t.shape)  # exact below 2**53
                table: dict[str, Any] = owner._parameters if attr in owner._parameters else owner._buffers
                table[attr] = nn.Parameter(positions, requires_grad=False) if isinstance(t, nn.Parameter) else positions
        remap_channels(probe, self._analysis, maps)
        index, shapes = {}, {}
        full = {name: t.shape for _, _, name, t in _tensors(self.model)}
        for owner, attr, name, t in list(_tensors(probe)):
            index[name] = _selection(t.detach().round().long().flatten(), full[name], t.shape)
            shapes[name] = t.shape
            table = owner._parameters if attr in owner._parameters else owner._buffers
            del table[attr]
        return _Plan(maps, probe, index, shapes)

    def _failure(self, maps: dict[int, ChannelMap]) -> str | None:
        """Why the network with ``maps`` applied fails on the analysis's input (a meta-device run); None if it runs."""
        plan = self._build_plan(maps)
        sources = self._sources()
        tensors = {n: torch.empty(plan.shapes[n], dtype=sources[n].dtype, device="meta") for n in plan.index}
        values = self._analysis.shapes.example.flat(self.model.graph)
        inputs = [torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v for v in values]
        try:  # fx prints the generated code of a failing graph to stderr: the reason returned is enough
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                functional_call(plan.skeleton.eval(), tensors, tuple(inputs))
        except Exception as e:  # noqa: BLE001 - any failure of the slimmed graph is reported as its reason
            return first_line(e, 160)
        return None

    def _drop_unrunnable(self, width: float = 0.5) -> None:
        """Keep at full width the groups whose slimming breaks the graph (a size computed from another tensor)."""
        maps = {
            gid: keep_map(g, kept_channels(g.channels, width, self.divisor, _unit(g))) for gid, g in self.groups.items()
        }
        if not maps or self._failure(maps) is None or self._failure({}) is not None:
            return  # runs slimmed, or cannot be checked on the meta device
        for gid in list(self.groups):
            reason = self._failure({gid: maps[gid]})
            if reason is not None:
                group = self.groups.pop(gid)
                if group.producers:
                    self.skipped.append(
                        f"'{group.producers[0].target}' ({group.channels} channels): slimming it fails: {reason}"
                    )
        remaining = {gid: maps[gid] for gid in self.groups}
        if remaining and (reason := self._failure(remaining)) is not None:
            raise SurgeryError(f"{type(self.model).__name__} does not run slimmed ({reason}); it cannot be slimmed yet")

    # --- running -------------------------------------------------------------------------------

    def _sources(self) -> dict[str, torch.Tensor]:
        return {name: t for _, _, name, t in _tensors(self.model)}

    def _tensors_at(self, plan: _Plan, resolution: Resolution | None) -> dict[str, torch.Tensor]:
        """The kept entries of every shared tensor at ``plan``'s width (calibrated statistics where there are)."""
        sources = self._sources()
        parameters = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        calibrated = self.bn_stats.get((self.width, resolution), {}) if resolution is not None else {}
        out = {}
        for name, index in plan.index.items():
            if name in calibrated:
                out[name] = calibrated[name]
                continue
            out[name] = _gather(sources[name], index, plan.shapes[name])
            if out[name] is sources[name] and name not in parameters:  # BatchNorm at a narrow width updates
                out[name] = out[name].clone()  # a copy of the full network's statistics, never them
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan(self.width)
        resolution = _resolution(args)
        if plan is None:
            stats = self.bn_stats.get((self.width, resolution)) if resolution is not None else None
            if not stats:
                return self.model(*args, **kwargs)
            return functional_call(self.model, stats, args, kwargs, strict=False)
        plan.skeleton.train(self.training)
        return functional_call(plan.skeleton, self._tensors_at(plan, resolution), args, kwargs)

    # --- standalone networks and statistics ------------------------------------------------------------

    def extract(self, width: float | None = None, resolution: Resolution | None = None) -> nn.Module:
        """A plain network at ``width`` (default: the current) with copies of its weights.

        BatchNorm statistics are those calibrated for ``resolution`` (an input's spatial size,
        e.g. ``(224, 224)``) when given, else the full network's sliced. The result equals the
        view at that width and resolution exactly, and is independent of it.

        A Hugging Face transformer of a family with a layout (:mod:`surgery.channels.layouts`)
        comes back as its own class with a config at the kept sizes, when one config
        describes them (every layer alike); otherwise as a graph, with a warning saying why.
        """
        graph = self._extract_graph(width, resolution)
        if not self._like or not hasattr(getattr(self._like[0], "config", None), "to_dict"):
            return graph
        try:
            return as_own_class(self._like[0], graph)
        except SurgeryError as e:
            warnings.warn(f"slim: extracted as a graph, not a {type(self._like[0]).__name__}: {e}", stacklevel=2)
            return graph

    def _extract_graph(self, width: float | None, resolution: Resolution | None) -> fx.GraphModule:
        w = self.width if width is None else check_width(width)
        result = copy.deepcopy(self.model)
        plan = self._plan(w)
        if plan is not None:
            remap_channels(result, self._analysis, plan.maps)  # the same entries the view gathers
        for name, t in self.bn_stats.get((w, resolution), {}).items() if resolution is not None else ():
            _assign(result, name, t.detach().clone())
        result.train(self.training)
        return extend_recipe(result, self.model, "slim", width=w, divisor=self.divisor)  # type: ignore[return-value]

    def recalibrate_bn(self, batches: Iterable[Any], num_batches: int | None = None) -> None:
        """Estimate BatchNorm statistics at the current width for the batches' resolution (see
        :func:`surgery.recalibrate_bn`); the view uses them at this width and resolution from now on."""
        batches = list(batches) if num_batches is None else [b for b, _ in zip(batches, range(num_batches))]
        if not batches:
            raise SurgeryError("recalibrate_bn got no batches; give at least one batch of inputs")
        resolution = _resolution((batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0],))
        assert resolution is not None
        self.bn_stats.pop((self.width, resolution), None)
        net = recalibrate_bn(self._extract_graph(None, None), batches)
        stats = {name: t for name, t in net.named_buffers() if name in self._sources()}
        self.bn_stats[(self.width, resolution)] = stats

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> SlimNet:  # type: ignore[override]
        super()._apply(fn, recurse)
        self.bn_stats = {key: {n: fn(t) for n, t in stats.items()} for key, stats in self.bn_stats.items()}
        return self

    def extra_repr(self) -> str:
        return f"width={self.width:g}, divisor={self.divisor}, groups={len(self.groups)}, skipped={len(self.skipped)}"


def _resolution(args: tuple[Any, ...]) -> Resolution | None:
    """The spatial size of the first input (its dims after batch and channels), the key of BatchNorm statistics."""
    x = args[0] if args else None
    return tuple(x.shape[2:]) if isinstance(x, torch.Tensor) and x.dim() > 2 else None


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace buffer ``name`` of ``module`` (a dotted path) by ``value``."""
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    owner._buffers[attr] = value


def slim(model: nn.Module, width: float = 1.0, divisor: int = 8, *, example_input: Any = None) -> SlimNet:
    """A :class:`SlimNet` of ``model`` at ``width`` sharing its weights (see the module docstring).

    >>> import torch, surgery
    >>> net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32).eval()
    >>> half = surgery.slim(net, width=0.5)
    >>> x = torch.randn(2, 3, 32, 32)
    >>> half(x).shape, half.extract().features[1].block.conv.out_channels
    (torch.Size([2, 10]), 8)
    """
    return SlimNet(model, width, divisor, example_input=example_input)


@register_replay("slim")
def _replay_slim(model: nn.Module, width: float, divisor: int = 8) -> nn.Module:
    return SlimNet(model, width, divisor)._extract_graph(None, None)
