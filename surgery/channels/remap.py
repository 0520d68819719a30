"""Rewrite weights so coupled channels follow an index map: permutations here, replications in ``growth``.

A :class:`ChannelMap` says, for each new channel position, which old channel it
holds (``-1``: a fresh channel). :func:`remap_channels` applies one map per coupled
group (see :mod:`surgery.channels`): producers and followers take the rows of their
old channels, consumers take the matching input columns divided by how many times
each old channel now appears (so a replicated channel contributes once in total,
and a fresh channel contributes nothing). A permutation is the special case where
every count is 1; the network's function is unchanged either way.

>>> import torch, torchvision, surgery
>>> net = torchvision.models.resnet18().eval()
>>> perm = torch.randperm(128).tolist()
>>> moved = surgery.permute_channels(net, "layer2", perm).eval()
>>> x = torch.randn(1, 3, 64, 64)
>>> bool((moved(x) - net(x)).abs().max() < 1e-4)
True
>>> torch.equal(moved.layer2[1].conv2.weight, net.layer2[1].conv2.weight[perm])
True
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from surgery.channels import ChannelAnalysis, Endpoint, Layout, analyze_channels
from surgery.channels.registry import _LITERAL_EDITS
from surgery.core.errors import SurgeryError
from surgery.core.recipe import extend_recipe, register_replay
from surgery.graph.capture import traced_copy


@dataclass(frozen=True)
class ChannelMap:
    """``index[j]`` is the old channel at new position ``j`` (``-1`` for a fresh channel) of ``old`` channels."""

    index: torch.Tensor
    old: int

    @classmethod
    def identity(cls, channels: int) -> ChannelMap:
        return cls(torch.arange(channels), channels)

    @classmethod
    def permutation(cls, perm: Sequence[int], blocks: int = 1) -> ChannelMap:
        """Position ``j`` takes old channel ``perm[j]``; with ``blocks`` > 1 channels must stay in their block."""
        index = torch.as_tensor(list(perm), dtype=torch.long)
        n = len(index)
        if n == 0 or not torch.equal(index.sort().values, torch.arange(n)):
            raise SurgeryError(
                f"perm must hold each of 0..{n - 1} exactly once; got {list(perm)[:8]}{'...' if n > 8 else ''}"
            )
        size = n // blocks
        if blocks > 1 and not torch.equal(index // size, torch.arange(n) // size):
            raise SurgeryError(
                f"grouped convs read these {n} channels in {blocks} blocks of {size}: perm must "
                "keep every channel in its block"
            )
        return cls(index, n)

    @property
    def size(self) -> int:
        return len(self.index)

    @property
    def counts(self) -> torch.Tensor:
        """How many new positions hold each old channel."""
        return torch.bincount(self.index[self.index >= 0], minlength=self.old)

    def spread(self, inner: int) -> ChannelMap:
        """The same map over features when each channel spans ``inner`` consecutive positions."""
        if inner == 1:
            return self
        positions = (self.index[:, None] * inner + torch.arange(inner)).flatten()
        fresh = (self.index < 0).repeat_interleave(inner)
        return ChannelMap(torch.where(fresh, -1, positions), self.old * inner)


def layout_map(layout: Layout, maps: dict[int, ChannelMap]) -> ChannelMap | None:
    """The map of a whole tensor dim holding several groups (a concatenation, a flatten); None if unchanged."""
    if not any(s.group in maps for s in layout.segments):
        return None
    parts, offset = [], 0
    for s in layout.segments:
        m = maps.get(s.group, ChannelMap.identity(s.channels)).spread(s.inner)
        parts.append(torch.where(m.index < 0, -1, m.index + offset))
        offset += s.size
    return ChannelMap(torch.cat(parts), offset)


# ----------------------------------------------------------------------------- tensor edits


def _take(t: torch.Tensor, dim: int, m: ChannelMap) -> torch.Tensor:
    """Slices of ``t`` along ``dim`` in map order; fresh positions get the mean slice."""
    out = t.index_select(dim, m.index.clamp(min=0))
    fresh = m.index < 0
    if fresh.any():
        shape = [1] * t.dim()
        shape[dim] = -1
        out = torch.where(fresh.view(shape), t.mean(dim, keepdim=True), out)
    return out


def _read(
    weight: torch.Tensor, m: ChannelMap, groups: int, noise: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Input columns of a (grouped) layer for map ``m``, divided by each old channel's count.

    ``noise`` > 0 adds Gaussian noise (``noise`` times the weights' std) to replicated
    columns, zero-sum over the copies of each channel, so the output stays the same.
    """
    out_ch, local, rest = weight.shape[0], weight.shape[1], weight.shape[2:]
    if m.old != local * groups or m.size % groups:
        raise SurgeryError(
            f"channel map {m.old}->{m.size} does not fit a layer with {local * groups} inputs in {groups} groups"
        )
    new_local = m.size // groups
    index = m.index.view(groups, new_local)
    fresh = index < 0
    local_index = index - (torch.arange(groups) * local)[:, None]
    if not bool((fresh | ((local_index >= 0) & (local_index < local))).all()):
        raise SurgeryError(f"channel map moves channels across the {groups} blocks of a grouped layer")
    counts = m.counts.to(weight.dtype).clamp(min=1)
    scale = torch.where(fresh, 0.0, 1.0 / counts[index.clamp(min=0)]).to(weight.dtype)
    trail = (1,) * len(rest)
    per_group = weight.reshape(groups, out_ch // groups, local, *rest)
    gather_index = (
        local_index.clamp(min=0).view(groups, 1, new_local, *trail).expand(groups, out_ch // groups, new_local, *rest)
    )
    if groups == 1:  # same result as the gather below, several times faster on large layers
        read = (weight.index_select(1, local_index[0].clamp(min=0)) * scale.view(1, new_local, *trail))[None]
    else:
        read = per_group.gather(2, gather_index) * scale.view(groups, 1, new_local, *trail)
    if noise > 0:
        e = torch.randn(read.shape, generator=generator, dtype=read.dtype) * (noise * float(weight.std()))
        e = torch.where(fresh.view(groups, 1, new_local, *trail), 0.0, e)
        sums = torch.zeros_like(per_group).scatter_add_(2, gather_index, e)
        copies = counts[index.clamp(min=0)].view(groups, 1, new_local, *trail)
        read = read + e - sums.gather(2, gather_index) / copies
    return read.reshape(out_ch, new_local, *rest)


def _param(t: torch.Tensor | None, value: torch.Tensor) -> Any:
    if t is None:
        return None
    return nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, _param(getattr(module, name), value))


def _rows(module: nn.Module, m: ChannelMap, names: Sequence[str] = ("weight", "bias")) -> None:
    for name in names:
        t = getattr(module, name, None)
        if t is not None:
            _set(module, name, _take(t.detach(), 0, m))


@dataclass(frozen=True)
class _Edit:
    """How one kind of layer takes a new map on its output ("out"), input ("in") or both ("through")."""

    out: Callable[[Any, ChannelMap], None] | None = None
    inp: Callable[[Any, ChannelMap, float, torch.Generator | None], None] | None = None
    through: Callable[[Any, ChannelMap, Endpoint], None] | None = None


def _conv_out(conv: nn.Conv2d, m: ChannelMap) -> None:
    _rows(conv, m)
    conv.out_channels = m.size


def _conv_in(conv: nn.Conv2d, m: ChannelMap, noise: float, gen: torch.Generator | None) -> None:
    _set(conv, "weight", _read(conv.weight.detach(), m, conv.groups, noise, gen))
    conv.in_channels = m.size


def _conv_through(conv: nn.Conv2d, m: ChannelMap, ep: Endpoint) -> None:
    _rows(conv, m)
    conv.in_channels = conv.out_channels = conv.groups = m.size


def _linear_out(linear: nn.Linear, m: ChannelMap) -> None:
    _rows(linear, m)
    linear.out_features = m.size


def _linear_in(linear: nn.Linear, m: ChannelMap, noise: float, gen: torch.Generator | None) -> None:
    _set(linear, "weight", _read(linear.weight.detach(), m, 1, noise, gen))
    linear.in_features = m.size


def _batchnorm_through(bn: nn.Module, m: ChannelMap, ep: Endpoint) -> None:
    _rows(bn, m, ("weight", "bias", "running_mean", "running_var"))
    bn.num_features = m.size


def _groupnorm_through(gn: nn.GroupNorm, m: ChannelMap, ep: Endpoint) -> None:
    _rows(gn, m)
    if gn.num_groups == gn.num_channels:  # one channel per group: an instance norm, whose group count follows
        gn.num_groups = m.size
    gn.num_channels = m.size


def _layernorm_through(ln: nn.LayerNorm, m: ChannelMap, ep: Endpoint) -> None:
    for name in ("weight", "bias"):
        t = getattr(ln, name, None)
        if t is not None:
            _set(ln, name, _take(t.detach(), ep.dim, m))
    shape = list(ln.normalized_shape)
    shape[ep.dim] = m.size
    ln.normalized_shape = tuple(shape)


def _attention_out(mha: nn.MultiheadAttention, m: ChannelMap) -> None:
    _linear_out(mha.out_proj, m)


def _attention_in(mha: nn.MultiheadAttention, m: ChannelMap, noise: float, gen: torch.Generator | None) -> None:
    _set(mha, "in_proj_weight", _read(mha.in_proj_weight.detach(), m, 1, noise, gen))
    if m.size != m.old:
        _attention_resize(mha, m.size)


def head_index(old: int, new: int, heads: int) -> torch.Tensor:
    """Positions kept when ``heads`` heads sharing ``old`` channels shrink to ``new``: each head's first ones."""
    if new % heads or old % heads or new > old:
        raise SurgeryError(f"{new} of {old} channels do not split into {heads} attention heads")
    head, new_head = old // heads, new // heads
    return (torch.arange(new_head) + (torch.arange(heads) * head)[:, None]).flatten()


def _qkv_index(old: int, new: int, heads: int) -> torch.Tensor:
    """:func:`head_index` in each of the query, key and value blocks of a packed projection."""
    inner = head_index(old, new, heads)
    return torch.cat([inner + b * old for b in range(3)])


# Tensors of attention whose size follows the embedding they read (the heads' total width), by endpoint kind:
# the rows of a packed query-key-value projection, the columns of the output projection.
_HEAD_EDITS: dict[str, Callable[[int, int, int], torch.Tensor]] = {"heads_qkv": _qkv_index, "heads_inner": head_index}


def _attention_resize(mha: nn.MultiheadAttention, size: int) -> None:
    """Shrink the heads' total width to ``size`` (the embedding's): every head keeps its first channels of
    queries, keys and values, and ``out_proj`` the matching columns."""
    heads, old = mha.num_heads, mha.embed_dim
    inner, rows = head_index(old, size, heads), _qkv_index(old, size, heads)
    new_head = size // heads
    _set(mha, "in_proj_weight", mha.in_proj_weight.detach().index_select(0, rows))
    if mha.in_proj_bias is not None:
        _set(mha, "in_proj_bias", mha.in_proj_bias.detach().index_select(0, rows))
    _set(mha.out_proj, "weight", mha.out_proj.weight.detach().index_select(1, inner))
    mha.out_proj.in_features = size
    mha.embed_dim = mha.kdim = mha.vdim = size
    mha.head_dim = new_head


def _embedding_out(emb: nn.Embedding, m: ChannelMap) -> None:
    _set(emb, "weight", _take(emb.weight.detach(), 1, m))
    emb.embedding_dim = m.size


def _conv1d_out(layer: nn.Module, m: ChannelMap) -> None:
    """Hugging Face's ``Conv1D`` (weight ``[in, out]``): new output columns and bias entries."""
    _set(layer, "weight", _take(layer.weight.detach(), 1, m))
    _set(layer, "bias", _take(layer.bias.detach(), 0, m))
    layer.nf = m.size


def _conv1d_in(layer: nn.Module, m: ChannelMap, noise: float, gen: torch.Generator | None) -> None:
    _set(layer, "weight", _read(layer.weight.detach().T, m, 1, noise, gen).T.contiguous())


def _prelu_through(prelu: nn.PReLU, m: ChannelMap, ep: Endpoint) -> None:
    _rows(prelu, m, ("weight",))
    prelu.num_parameters = m.size


_EDITS: dict[type, _Edit] = {
    nn.Conv2d: _Edit(_conv_out, _conv_in, _conv_through),
    nn.Linear: _Edit(_linear_out, _linear_in),
    nn.modules.batchnorm._NormBase: _Edit(through=_batchnorm_through),
    nn.GroupNorm: _Edit(through=_groupnorm_through),
    nn.LayerNorm: _Edit(through=_layernorm_through),
    nn.PReLU: _Edit(through=_prelu_through),
    nn.MultiheadAttention: _Edit(_attention_out, _attention_in),
    nn.Embedding: _Edit(out=_embedding_out),
}
# classes of optional packages, by name (importing them here would make transformers a dependency)
_EDITS_BY_NAME: dict[str, _Edit] = {"Conv1D": _Edit(_conv1d_out, _conv1d_in)}


def _edit_for(module: nn.Module) -> _Edit:
    for cls in type(module).__mro__:
        found = _EDITS.get(cls) or _EDITS_BY_NAME.get(cls.__name__)
        if found is not None:
            return found
    return _Edit()


def _owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    """The module holding the tensor at dotted path ``target``, and the tensor's name in it."""
    owner_path, _, name = target.rpartition(".")
    return (gm.get_submodule(owner_path) if owner_path else gm), name


def _remap_parameter(gm: fx.GraphModule, ep: Endpoint, m: ChannelMap) -> None:
    owner, name = _owner(gm, ep.target)
    _set(owner, name, _take(getattr(owner, name).detach(), ep.dim, m))


def _boundaries(layout: Layout, maps: dict[int, ChannelMap]) -> dict[int, int]:
    """Old position -> new position of every segment boundary along ``layout``'s dim under ``maps``."""
    table, old, new = {0: 0}, 0, 0
    for s in layout.segments:
        old += s.size
        new += maps[s.group].size * s.inner if s.group in maps else s.size
        table[old] = new
    return table


def _rewrite_literal(node: fx.Node, ep: Endpoint, layout: Layout, maps: dict[int, ChannelMap]) -> bool:
    """Rewrite the channel counts a graph node spells out (a slice, a split) for ``maps``; True if it changed."""
    table = _boundaries(layout, maps)
    if all(k == v for k, v in table.items()):
        return False

    def moved(position: int) -> int:
        if position not in table:
            raise SurgeryError(f"node '{node.name}' cuts channels at position {position}, inside a channel group")
        return table[position]

    _LITERAL_EDITS[ep.kind](node, ep, moved, layout.size)
    return True


def remap_channels(
    gm: fx.GraphModule,
    analysis: ChannelAnalysis,
    maps: dict[int, ChannelMap],
    *,
    keep_producers: Collection[str] = (),
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> None:
    """Edit ``gm``'s weights in place so each group ``g`` in ``maps`` takes the channels ``maps[g]``.

    ``analysis`` must describe ``gm``'s graph. Producers in ``keep_producers`` (node names)
    are left alone: their output is extended by other means (a concatenation). ``noise``
    is passed to the consumers' columns (see :func:`_read`). The graph only changes where
    it spells out a channel count that changes (a slice bound, split sizes: the groups'
    ``literals``); it is then recompiled.
    """
    edits: dict[tuple[str, str, int], tuple[str, Endpoint]] = {}
    for gid in maps:
        group = analysis.groups[gid]
        roles = (("out", group.producers), ("through", group.followers), ("in", group.consumers))
        for role, endpoints in (*roles, ("literal", group.literals)):
            for ep in endpoints:
                if role == "out" and ep.node in keep_producers:
                    continue
                edits.setdefault((ep.target, role, ep.dim), (role, ep))
    order = {"out": 0, "through": 1, "in": 2, "literal": 3}
    nodes = {n.name: n for n in gm.graph.nodes}
    rewritten = False
    for (target, role, _), (_, ep) in sorted(edits.items(), key=lambda kv: order[kv[1][0]]):
        layout = analysis.layouts[ep.space]
        if role == "literal":
            rewritten = _rewrite_literal(nodes[ep.node], ep, layout, maps) or rewritten
            continue
        m = layout_map(layout, maps)
        if m is None:
            continue
        if ep.kind == "parameter":
            _remap_parameter(gm, ep, m)
            continue
        if ep.kind in _HEAD_EDITS:
            if m.size != m.old:  # permutations of the embedding leave the heads as they are
                owner, name = _owner(gm, ep.target)
                index = _HEAD_EDITS[ep.kind](m.old, m.size, ep.groups)
                _set(owner, name, getattr(owner, name).detach().index_select(ep.dim, index))
            continue
        module = gm.get_submodule(target)
        edit = _edit_for(module)
        fn = {"out": edit.out, "in": edit.inp, "through": edit.through}[role]
        if fn is None:
            raise SurgeryError(f"cannot change the channels of '{target}' ({type(module).__name__}) as a {role} layer")
        if role == "in":
            fn(module, m, noise, generator)
        elif role == "out":
            fn(module, m)
        else:
            fn(module, m, ep)
    if rewritten:
        gm.recompile()


# ----------------------------------------------------------------------------- permute_channels


def permute_channels(model: nn.Module, at: str, perm: Sequence[int], *, example_input: Any = None) -> fx.GraphModule:
    """Permute the channels of the value at cut name ``at`` and every weight that touches them.

    The producer(s) of the value (all of them when it is a residual stream), their
    BatchNorms and depthwise convs, and every consumer are permuted so the model's
    output is unchanged. Returns a new GraphModule; ``model`` is untouched.

    Args:
        model: any fx-traceable module (or GraphModule).
        at: a module path (``"layer2"``) or fx node name whose output to permute.
        perm: new channel ``j`` is old channel ``perm[j]``.
        example_input: an input fixing the shapes, if the default image sizes do not run.

    >>> import torch, surgery
    >>> net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32).eval()
    >>> perm = torch.randperm(8).tolist()
    >>> shuffled = surgery.permute_channels(net, "features.0", perm).eval()
    >>> torch.equal(shuffled.features[0].block.conv.weight, net.features[0].block.conv.weight[perm])
    True
    >>> x = torch.randn(2, 3, 32, 32)
    >>> bool((shuffled(x) - net(x)).abs().max() < 1e-5)
    True
    """
    result = traced_copy(model)
    analysis = analyze_channels(result, example_input)
    group = analysis.group_at(at)
    reason = group.obstacle(replicate=False)
    if reason is not None:
        raise SurgeryError(f"the channels at '{at}' cannot be permuted without changing the output: {reason}")
    if len(perm) != group.channels:
        raise SurgeryError(
            f"perm has {len(perm)} entries but '{at}' has {group.channels} channels; give a "
            f"permutation of 0..{group.channels - 1}"
        )
    remap_channels(result, analysis, {group.id: ChannelMap.permutation(perm, group.blocks)})
    args: dict[str, Any] = {"at": at, "perm": [int(p) for p in perm]}
    if example_input is not None:
        args["input_shape"] = list(example_input.shape)
    return extend_recipe(result, model, "permute_channels", **args)


@register_replay("permute_channels")
def _replay_permute(model: nn.Module, at: str, perm: list[int], input_shape: list[int] | None = None) -> nn.Module:
    return permute_channels(model, at, perm, example_input=torch.zeros(input_shape) if input_shape else None)
