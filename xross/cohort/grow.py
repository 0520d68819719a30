"""Growing one net of a cohort in place: the net grown whole, cut again at its cuts, its adapters grown with it.

A net's pieces share their layers with the whole net (:attr:`Cohort.wholes`), so growing
it is: the growth steps on the whole net (:func:`growth.grow_steps`), :func:`surgery.cut` at
the same cuts, and at every boundary whose width changed, the adapters that read or write it
follow the new channels: an adapter reading the grown net divides the copies' weights by their
count (as any reader of copied channels does), one writing into it copies its output channels
(and its BatchNorm's), and where two nets' shapes agreed and no adapter was needed, a new
linear adapter averages the copies (from the grown net) or repeats the channels (into it).
Every stitched path keeps its function. Which old channel each new one copies is measured, not
assumed: on a float64 copy with random weights, grown by the same steps, the boundary values are
matched channel by channel.

>>> import torch, growth
>>> from xross.cohort.grid import Cohort
>>> from xross.cohort.grow import grow_net
>>> cohort = Cohort.build(["growth.models:small_vgg"] * 2, ["features.0"], num_classes=10, image_size=32).eval()
>>> x = torch.randn(2, 3, 32, 32)
>>> before = cohort.forward_paths(x, cohort.paths())
>>> steps = growth.expand(cohort.wholes[0], "net2wider", "all", factor=2, example_input=x)
>>> _ = grow_net(cohort, 0, steps, image_size=32)
>>> sorted(cohort.adapters)                      # 64 <-> 32 channels now: adapters where none were needed
['b0_0to1', 'b0_1to0']
>>> after = cohort.eval().forward_paths(x, cohort.paths())
>>> all(torch.allclose(after[p], before[p], atol=1e-5) for p in cohort.paths())
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

import surgery
from growth import MutationRecord, grow_steps, lineage
from growth.provenance import Origin, without_noise
from surgery.core.errors import SurgeryError
from surgery.core.util import evaluating, first_line
from surgery.pieces.adapters import Adapter
from surgery.pieces.cut import piece_info
from xross.cohort.grid import Cohort, adapter_key
from xross.errors import XrossError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ChannelCopies:
    """At one boundary: new channel ``k`` copies old channel ``index[k]``; ``dim`` is the channel axis of a
    per-sample value (0 for (C,H,W), last for (D,) and (T,D))."""

    index: torch.Tensor
    old: int
    dim: int

    @property
    def counts(self) -> torch.Tensor:
        return torch.bincount(self.index, minlength=self.old).to(torch.float64)


def _boundary_shapes(pieces: surgery.Pieces) -> list[Shape]:
    shapes = []
    for piece in list(pieces)[:-1]:
        specs = piece_info(piece).out_specs
        shape = specs[0].shape if specs and specs[0] is not None else None
        if shape is None:
            raise XrossError("growth needs the boundary shapes of the cut nets; cut them on an example")
        shapes.append(tuple(shape))
    return shapes


def _channel_copies(
    whole: nn.Module,
    steps: Sequence[MutationRecord],
    cuts: list[str],
    example: torch.Tensor,
    changed: list[int],
    vocab: int | None = None,
) -> dict[int, ChannelCopies]:
    """Which old channel each new channel copies at the ``changed`` boundaries, matched on random weights (and
    random inputs: token ids below ``vocab`` for causal LMs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        twin = copy.deepcopy(whole).double().eval()
        with torch.no_grad():
            for p in twin.parameters():
                p.copy_(
                    torch.randn_like(p) / max(p[0].numel(), 1) ** 0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p)
                )
        x = torch.randn(example.shape, dtype=torch.float64) if vocab is None else torch.randint(0, vocab, example.shape)
        grown = grow_steps(twin, without_noise(steps), x).eval()
        old_values, new_values = _values_at(twin, cuts, x), _values_at(grown, cuts, x)
    found = {}
    for b in changed:
        old, new = old_values[b], new_values[b]
        dim = 1 if old.dim() == 4 else old.dim() - 1
        a = old.movedim(dim, 0).reshape(old.shape[dim], -1)
        c = new.movedim(dim, 0).reshape(new.shape[dim], -1)
        distance = torch.cdist(c, a)
        best = distance.argmin(dim=1)
        worst = float(distance.gather(1, best[:, None]).max())
        if a.shape[1] != c.shape[1] or worst > 1e-6 * max(float(a.abs().max()), 1e-12):
            raise XrossError(
                f"the growth changed the value at cut {cuts[b]} other than by copying its channels; "
                "the adapters cannot follow it: grow elsewhere, or cut after the grown layers"
            )
        found[b] = ChannelCopies(best, a.shape[0], 0 if old.dim() == 4 else old.dim() - 2)
    return found


def _values_at(model: nn.Module, cuts: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    pieces = surgery.cut(model, cuts, x)
    values, value = [], x
    with torch.no_grad():
        for k, piece in enumerate(pieces):
            value = piece(*value) if isinstance(value, tuple) else piece(value)
            if k < len(pieces) - 1:
                values.append(value[0] if isinstance(value, tuple) else value)
    return values


def _positions(shape: torch.Size, dim: int, index: torch.Tensor) -> torch.Tensor:
    return torch.arange(int(torch.tensor(shape).prod())).reshape(shape).index_select(dim, index)


def _take(
    module: nn.Module, name: str, dim: int, copies: ChannelCopies, reader: bool, origins: dict[nn.Parameter, Origin]
) -> None:
    """Replace ``module.name`` by its slices along ``dim`` that ``copies`` names: a reader's weights are divided
    by the copies' count (gradient scale 1), a writer's are copied (gradient scale 1 / count)."""
    old = getattr(module, name)
    if old is None:
        return
    index = copies.index.to(old.device)
    counts = copies.counts.to(old.device)[index]
    shape = [1] * old.dim()
    shape[dim] = -1
    value = old.detach().index_select(dim, index)
    if reader:
        value = value / counts.view(shape).to(value.dtype)
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        scale = torch.ones(new.shape, dtype=torch.float64) if reader else (1 / counts).view(shape).expand(new.shape)
        origins[new] = Origin([old], _positions(old.shape, dim, copies.index), scale.cpu().clone())
        setattr(module, name, new)
    else:
        module.register_buffer(name, value)


def _grow_reader(adapter: Adapter, copies: ChannelCopies, shape: Shape, origins: dict[nn.Parameter, Origin]) -> None:
    _take(adapter.map, "weight", 1, copies, reader=True, origins=origins)
    if isinstance(adapter.map, nn.Conv2d):
        adapter.map.in_channels = int(copies.index.numel())
    else:
        adapter.map.in_features = int(copies.index.numel())
    adapter.in_shape = shape


def _grow_writer(adapter: Adapter, copies: ChannelCopies, shape: Shape, origins: dict[nn.Parameter, Origin]) -> None:
    if isinstance(adapter.norm, nn.LayerNorm) and len(set(copies.counts.tolist())) > 1:
        raise XrossError(
            "an adapter with a LayerNorm writes into the grown boundary, which copies channels unevenly; "
            "widen by an integer factor, or train without --adapter-batchnorm"
        )
    for name in ("weight", "bias"):
        _take(adapter.map, name, 0, copies, reader=False, origins=origins)
    if isinstance(adapter.map, nn.Conv2d):
        adapter.map.out_channels = int(copies.index.numel())
    else:
        adapter.map.out_features = int(copies.index.numel())
    norm = adapter.norm
    if isinstance(norm, (nn.BatchNorm2d, nn.LayerNorm)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            if hasattr(norm, name):
                _take(norm, name, 0, copies, reader=False, origins=origins)
        if isinstance(norm, nn.BatchNorm2d):
            norm.num_features = int(copies.index.numel())
        else:
            norm.normalized_shape = (int(copies.index.numel()),)
    adapter.out_shape = shape


def _linear_adapter(have: Shape, want: Shape, side: int, weight: torch.Tensor, like: torch.Tensor) -> Adapter:
    """A new adapter whose map is ``weight`` (no bias, no norm, no ReLU): a linear copy of channels."""
    with torch.random.fork_rng(devices=[]):
        adapter = Adapter(have, want, batchnorm=False, relu=False, side_values=side)
    adapter = adapter.to(like.device, like.dtype)
    with torch.no_grad():
        adapter.map.weight.copy_(weight.reshape(adapter.map.weight.shape))
        if adapter.map.bias is not None:
            adapter.map.bias.zero_()
    return adapter


def grow_model(
    model: nn.Module,
    steps: Sequence[MutationRecord],
    example: torch.Tensor,
    *,
    carry: bool = False,
    init: str = "copy",
    seed: int = 0,
) -> tuple[nn.Module, dict[nn.Parameter, Origin]]:
    """``model`` grown by ``steps`` (measured on ``example``), and with ``carry`` where each of its parameters
    came from. ``init="random"``: the new units start as a fresh network of the grown shape would (seeded),
    the function no longer preserved; only what stays in place keeps its weights (and optimiser state)."""
    with evaluating(model):
        grown = grow_steps(model, steps, example)
        line = lineage(model, steps, example, grown) if (carry or init == "random") else None
    if init == "random":
        assert line is not None
        line.reinitialise(model, grown, seed)
    origins = line.origins(model, grown, originals_only=init == "random") if (carry and line is not None) else {}
    return grown, origins


def grow_net(
    cohort: Cohort,
    net: int,
    steps: Sequence[MutationRecord],
    image_size: int,
    *,
    example: torch.Tensor | None = None,
    carry: bool = False,
    init: str = "copy",
    seed: int = 0,
    transform: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[nn.Parameter, Origin]:
    """Grow net ``net`` of ``cohort`` by ``steps`` in place (pieces, whole and adapters); every path keeps its
    function. With ``carry``, returns where each new parameter came from (:class:`~growth.provenance.Origin`)
    for the optimiser; ``example`` (a batch) is what the ops measure new layers' statistics on; ``init`` and
    ``seed`` as :func:`grow_model`; ``transform(grown)`` runs before the cut, as ``Cohort.build``'s
    ``transform_net`` (it must keep the parameter objects: the origins name them)."""
    whole = cohort.wholes[net]
    old_pieces = cast(surgery.Pieces, cohort.nets[net])
    if whole is None or not _shares(whole, old_pieces):
        raise XrossError(
            f"net {net} ({cohort.names[net]}) cannot grow: its pieces do not share its layers "
            "(growth during training needs nets captured by torch.fx)"
        )
    ref = next(whole.parameters())
    if cohort.text is not None:  # causal LMs read token ids, as they are
        x = example if example is not None else torch.zeros(2, cohort.text.seq_len, dtype=torch.int64)
        x = x.to(ref.device)
    else:
        x = example if example is not None else torch.zeros(2, 3, image_size, image_size, dtype=ref.dtype)
        x = x.to(ref.device, ref.dtype)
    cuts = list(old_pieces.cuts)
    try:
        grown, origins = grow_model(whole, steps, x, carry=carry, init=init, seed=seed)
        if transform is not None:
            grown = transform(grown)
        pieces = surgery.cut(grown.eval(), cuts, x[:1])
    except SurgeryError as e:
        raise XrossError(f"growing net {net} ({cohort.names[net]}): {first_line(e)}") from None
    pieces.train(cohort.training)
    old_shapes, new_shapes = _boundary_shapes(old_pieces), _boundary_shapes(pieces)
    changed = [b for b, (o, n) in enumerate(zip(old_shapes, new_shapes)) if o != n]
    if changed:
        with evaluating(whole):
            maps = _channel_copies(whole, steps, cuts, x[:2], changed, cohort.text.vocab if cohort.text else None)
        _grow_adapters(cohort, net, maps, old_shapes, new_shapes, pieces, origins, ref)
    cohort.nets[net] = pieces
    cohort.wholes[net] = grown
    return origins


def _grow_adapters(
    cohort: Cohort,
    net: int,
    maps: dict[int, ChannelCopies],
    old_shapes: list[Shape],
    new_shapes: list[Shape],
    pieces: surgery.Pieces,
    origins: dict[nn.Parameter, Origin],
    like: torch.Tensor,
) -> None:
    for b, copies in maps.items():
        side = len(piece_info(pieces[b]).out_specs or ()) - 1
        for other in range(cohort.num_nets):
            if other == net:
                continue
            theirs = _boundary_shapes(cohort.nets[other])[b]  # type: ignore[arg-type]
            for src, dst in ((net, other), (other, net)):
                key = adapter_key(b, src, dst)
                have = new_shapes[b] if src == net else theirs
                want = theirs if src == net else new_shapes[b]
                if key in cohort.adapters:
                    adapter = cohort.adapters[key]
                    assert isinstance(adapter, Adapter), "cohort adapters are surgery Adapters"
                    (_grow_reader if src == net else _grow_writer)(
                        adapter, copies, have if src == net else want, origins
                    )
                    continue
                if have == want:
                    continue
                old_side = old_shapes[b]
                if src == net:  # average the copies back to the old channels
                    weight = torch.zeros(old_side[copies.dim], copies.index.numel(), dtype=like.dtype)
                    weight[copies.index, torch.arange(copies.index.numel())] = 1.0
                    weight /= weight.sum(dim=1, keepdim=True)
                else:  # repeat the channels the grown net copies
                    weight = torch.zeros(copies.index.numel(), old_side[copies.dim], dtype=like.dtype)
                    weight[torch.arange(copies.index.numel()), copies.index] = 1.0
                if old_side != theirs:
                    raise XrossError(
                        f"cut {b}: nets {src} and {dst} had no adapter but different shapes; this is a bug"
                    )
                cohort.adapters[key] = _linear_adapter(have, want, side, weight, like)


def _shares(whole: nn.Module, pieces: nn.Module) -> bool:
    mine = {id(p) for p in whole.parameters()}
    return all(id(p) in mine for p in pieces.parameters())
