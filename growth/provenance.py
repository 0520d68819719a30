"""Where every weight of a grown network came from: which old element it copies, and how it was scaled.

A function-preserving op builds each new weight ``w'[e]`` as ``a[e] * w[o(e)]``, a copy of
an old element ``o(e)`` scaled by ``a[e]`` (net2wider's readers divide copies by their
count), or as a new value (an inserted layer, a padded kernel tap). :func:`lineage` finds
``o`` and ``a`` for any registered op without knowing its internals: it replays the steps
on two float64 copies of the model, one whose parameters are all equal (giving ``a``) and
one whose parameters are their own position 1, 2, 3, ... (giving ``o = w' / a``), and checks
the result against the grown weights. Only parameters whose name exists before and after
are followed; parameters under new names are new.

The gradient of a copy is then fixed too: the grown network at the copied weights computes
the old function, and the copies of one element are interchangeable, so each of the
``N[o]`` copies of ``o`` receives ``g[o] / (N[o] * a[e])`` (:attr:`Lineage.gradient_scale`;
docs/RESEARCH.md derives it). Optimiser moments carried through a growth use this scale.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from growth.errors import GrowthError
from growth.mutation import MutationRecord
from growth.registry import get_op

NEW = -1  # the index of an element that copies nothing
UNIT, TAG = 2.0**-10, 2.0**-40  # the value of every weight in the copy that finds scales; of tag 1 in the other


def grow_steps(model: nn.Module, steps: Sequence[MutationRecord], example_input: Any = None) -> nn.Module:
    """``model`` after every step (op, site, arguments) in turn; ``model`` itself is not modified.

    >>> import torchvision, growth
    >>> net = torchvision.models.resnet18()
    >>> steps = growth.expand(net, "net2deeper", "stages") + growth.expand(net, "net2wider", "layer1.0.conv1", factor=2)
    >>> grown = growth.grow_steps(net, steps)
    >>> grown.layer1[0].conv1.out_channels, hasattr(grown.layer4, "net2deeper0")
    (128, True)
    """
    for k, record in enumerate(steps):
        model = get_op(record.op).apply(model, record.site, record.args, example_input)
        if k + 1 < len(steps):
            gc.collect()  # the step before's model: a grown GraphModule is a reference cycle
    return model


def without_noise(steps: Sequence[MutationRecord]) -> list[MutationRecord]:
    """``steps`` with any ``noise`` argument set to 0 (the copies exact: what lineage and matching follow)."""
    return [r.model_copy(update={"args": {**r.args, "noise": 0.0}}) if r.args.get("noise") else r for r in steps]


def _filled(model: nn.Module, values: list[torch.Tensor]) -> nn.Module:
    """A float64 copy of ``model`` whose parameters hold ``values`` (in ``named_parameters`` order)."""
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        for p, v in zip(twin.parameters(), values):
            p.copy_(v.reshape(p.shape))
    return twin


@dataclass
class Origin:
    """Where one grown parameter came from: element ``k`` copies element ``index[k]`` of the old parameters
    ``sources`` (flattened and concatenated; :data:`NEW`: a new element) and, while the copies are equal,
    its gradient is ``scale[k]`` times that element's (the scale optimiser moments are carried by)."""

    sources: list[nn.Parameter]
    index: torch.Tensor
    scale: torch.Tensor


@dataclass
class Lineage:
    """Per grown parameter name: ``index`` (the flat position, over the old model's parameters in
    ``named_parameters`` order, of the element each element copies; :data:`NEW` for a new one) and
    ``scale`` (the factor the copy was multiplied by); ``old_names`` are the old parameters in that order."""

    old_names: list[str]
    old_numels: list[int]
    index: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]

    def copies(self) -> torch.Tensor:
        """How many grown elements copy each old element (flat, over the old parameters)."""
        total = torch.zeros(sum(self.old_numels), dtype=torch.float64)
        for index in self.index.values():
            kept = index[index != NEW]
            total.index_add_(0, kept, torch.ones(kept.numel(), dtype=torch.float64))
        return total

    def gradient_scale(self, name: str, copies: torch.Tensor | None = None) -> torch.Tensor:
        """``1 / (N[o] * a)`` per element of grown parameter ``name`` (0 for new elements): its gradient over the
        gradient of the element it copies, while the copies are equal."""
        index, scale = self.index[name], self.scale[name]
        copies = self.copies() if copies is None else copies
        kept = index != NEW
        out = torch.zeros(index.shape, dtype=torch.float64)
        out[kept] = 1.0 / (copies[index[kept]] * scale[kept])
        return out

    def origins(self, old: nn.Module, grown: nn.Module, *, originals_only: bool = False) -> dict[nn.Parameter, Origin]:
        """Each parameter of ``grown`` (grown from ``old`` by the traced steps) with its :class:`Origin`.

        ``originals_only``: only the elements that stay where they were (:meth:`same_place`) keep a source,
        with gradient scale 1 (what a random initialisation of the new units keeps)."""
        sources, copies = list(old.parameters()), self.copies()
        shapes = {n: p.shape for n, p in old.named_parameters()}
        found = {}
        for name, p in grown.named_parameters():
            if originals_only:
                kept = self.same_place(name, shapes)
                index = torch.where(kept, self.index[name], torch.full_like(self.index[name], NEW))
                found[p] = Origin(sources, index, kept.double())
            else:
                found[p] = Origin(sources, self.index[name], self.gradient_scale(name, copies))
        return found

    @torch.no_grad()
    def reinitialise(self, old: nn.Module, grown: nn.Module, seed: int) -> None:
        """Give ``grown``'s new units random weights, as a fresh network of its shape starts (each module's
        ``reset_parameters``, seeded): only the elements that stay where they were keep their old values."""
        fresh = copy.deepcopy(grown)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in fresh.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        shapes = {n: p.shape for n, p in old.named_parameters()}
        flat = torch.cat([p.detach().reshape(-1) for p in old.parameters()])
        new_values = dict(fresh.named_parameters())
        for name, p in grown.named_parameters():
            kept = self.same_place(name, shapes).to(p.device)
            old_values = flat[self.index[name].clamp_min(0).to(flat.device)].reshape(p.shape).to(p.dtype)
            p.copy_(torch.where(kept, old_values, new_values[name].detach().to(p.dtype)))

    def same_place(self, name: str, old_shapes: dict[str, torch.Size]) -> torch.Tensor:
        """True where an element of ``name`` copies the old element at its own position of the same parameter
        with scale 1 and no other element copies it more faithfully: the original, not a copy of it."""
        index, new_shape = self.index[name], self.index[name].shape
        if name not in old_shapes:
            return torch.zeros(new_shape, dtype=torch.bool)
        old_shape = old_shapes[name]
        start = sum(self.old_numels[: self.old_names.index(name)])
        flat = torch.arange(index.numel()).reshape(new_shape)
        if len(old_shape) != len(new_shape):
            return torch.zeros(new_shape, dtype=torch.bool)
        coords = torch.stack(torch.unravel_index(flat, new_shape))  # (dims, *shape)
        inside = torch.ones(new_shape, dtype=torch.bool)
        for d, size in enumerate(old_shape):
            inside &= coords[d] < size
        old_flat = torch.zeros(new_shape, dtype=torch.long)
        stride = 1
        for d in reversed(range(len(old_shape))):
            old_flat += coords[d].clamp(max=old_shape[d] - 1) * stride
            stride *= old_shape[d]
        return inside & (index == start + old_flat)


def _grown_values(
    model: nn.Module, values: list[torch.Tensor], steps: Sequence[MutationRecord], example: Any
) -> dict[str, torch.Tensor]:
    """The parameters of a float64 copy of ``model`` holding ``values``, grown by ``steps`` (nothing else kept)."""
    twin = grow_steps(_filled(model, values), steps, example)
    values.clear()
    found = {name: p.detach() for name, p in twin.named_parameters()}
    del twin
    gc.collect()
    return found


def lineage(
    model: nn.Module, steps: Sequence[MutationRecord], example_input: Any = None, grown: nn.Module | None = None
) -> Lineage:
    """Where each parameter element of ``grow_steps(model, steps)`` came from (noise set to 0); ``grown``: that
    model if the caller has it (grown without noise), else it is grown here to check against.

    Raises a one-line :class:`~growth.errors.GrowthError` when the grown weights are not the
    copies found (an op whose edits depend on the weights' values).

    >>> import torch, growth
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> steps = [growth.MutationRecord(op="net2wider", site="0", args={"new_width": 4, "seed": 0})]
    >>> line = growth.lineage(net, steps, example_input=torch.randn(2, 3))
    >>> line.old_names
    ['0.weight', '0.bias', '2.weight', '2.bias']
    >>> line.index["2.weight"].tolist()  # the reader's four inputs copy its old inputs (flat 8, 9) twice each
    [[8, 9, 8, 9]]
    >>> line.gradient_scale("2.weight").tolist(), line.gradient_scale("0.bias").tolist()
    ([[1.0, 1.0, 1.0, 1.0]], [0.5, 0.5, 0.5, 0.5])
    """
    made = grown if grown is not None and not any(r.args.get("noise") for r in steps) else None
    steps = without_noise(steps)
    twin_input = pytree.tree_map(
        lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v, example_input
    )
    names = [n for n, _ in model.named_parameters()]
    numels = [p.numel() for p in model.parameters()]
    total = sum(numels)
    # powers of two scale exactly; small values keep a deep net's activations finite in both copies
    with torch.no_grad():
        by_ones = _grown_values(model, [torch.full((n,), UNIT, dtype=torch.float64) for n in numels], steps, twin_input)
        tags = (torch.arange(1, total + 1, dtype=torch.float64) * TAG).split(numels)
        by_tags = _grown_values(model, list(tags), steps, twin_input)
        del tags
        after = dict((made if made is not None else grow_steps(model, steps, example_input)).named_parameters())
    old = dict(model.named_parameters())
    flat_old = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()]) if names else torch.zeros(0)
    index: dict[str, torch.Tensor] = {}
    scale: dict[str, torch.Tensor] = {}
    for name, param in after.items():
        a, v = by_ones[name].detach(), by_tags[name].detach()
        found = torch.full(a.shape, NEW, dtype=torch.long)
        if name in old:
            a = a / UNIT
            ratio = torch.where(a > 0, v / TAG / a.clamp_min(1e-300), torch.zeros_like(v))
            tag = ratio.round()
            copied = (a > 0) & (tag >= 1) & (tag <= total) & ((ratio - tag).abs() <= 1e-6 * tag.clamp_min(1))
            found[copied] = tag[copied].long() - 1
            real = param.detach().double()
            expect = a * flat_old[found.clamp_min(0)].reshape(a.shape)
            bad = copied & ((real - expect).abs() > 1e-5 * (expect.abs() + 1e-6))
            if bool(bad.any()):
                raise GrowthError(
                    f"the grown '{name}' is not a copy of old weights where the op's pattern says it is (its edits "
                    "depend on the weights' values); its optimiser state cannot be carried: use reset"
                )
        index[name], scale[name] = found, a.double()
    return Lineage(names, numels, index, scale)
