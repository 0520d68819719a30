"""Apply axis maps to a transformer in place: every parameter, the modules' size attributes, shared weights.

Each parameter's axes come from its family's layout (:mod:`surgery.channels.layouts`);
whether a layer reads or writes along an axis comes from the layer's type (a Linear
writes along its weight's rows and reads along its columns; HF's ``Conv1D`` the other
way round; an embedding, a bias, a class token write). Norm gains and biases follow
the stream (copied; with padding, the gains are scaled and the norm's eps with them).
A weight shared by two layers (tied input and output embeddings) is grown once, as the
embedding writes it, and stays shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from growth.errors import GrowthError
from growth.transformer.maps import PAD, AxisMap
from surgery.channels.layouts import Layout

MapsOf = Callable[[str], dict[str, AxisMap]]  # parameter name -> the maps of the dimensions it spans


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the families' own norm classes (by name: ``LlamaRMSNorm``, ``LayerNorm``)."""
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("RMSNorm", "LayerNorm", "Norm2d"))


def norm_kind(module: nn.Module) -> str:
    """``"layer"`` for a norm that subtracts the mean (it has a bias or is a LayerNorm), else ``"rms"``."""
    return "layer" if isinstance(module, nn.LayerNorm) or getattr(module, "bias", None) is not None else "rms"


def _io(module: nn.Module, leaf: str, axes: int) -> tuple[str, ...]:
    """For each axis of parameter ``leaf`` of ``module``: does the layer write (``w``) or read (``r``) along it."""
    kind = type(module).__name__
    if leaf == "weight" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ("w", "r") + ("-",) * (axes - 2)
    if leaf == "weight" and kind == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
        return ("r", "w")
    return ("w",) * axes  # embeddings, biases, class tokens, position tables


def writes_along(module: nn.Module, leaf: str, axes: tuple[str, ...]) -> set[str]:
    """The dimensions parameter ``leaf`` of ``module`` writes along (``{"h"}`` for an output projection)."""
    return {dim for dim, io in zip(axes, _io(module, leaf, len(axes))) if io == "w"}


def _grow_norm(tensor: torch.Tensor, leaf: str, hidden: AxisMap) -> torch.Tensor:
    if not hidden.changes:
        return tensor
    grown = hidden.write(tensor, 0)
    if not hidden.padded:
        return grown
    if leaf == "weight":  # padding scales the variance by old/new: the gain takes sqrt(old/new)
        return grown * math.sqrt(hidden.old / hidden.new)
    return grown * (hidden.index != PAD).to(grown.dtype)


def grow_tensor(
    name: str, tensor: torch.Tensor, module: nn.Module, leaf: str, layout: Layout, maps: dict[str, AxisMap]
) -> torch.Tensor:
    """The grown value of parameter ``name`` (``leaf`` of ``module``) under ``maps``."""
    axes = layout.axes(name)
    if len(axes) != tensor.dim():
        raise GrowthError(f"'{name}' has {tensor.dim()} axes, its {layout.name} layout {len(axes)}; update the layout")
    if is_norm(module) and axes == ("h",):
        return _grow_norm(tensor, leaf, maps["h"])
    out = tensor
    for axis, (dim, io) in enumerate(zip(axes, _io(module, leaf, tensor.dim()))):
        if dim == "-" or not maps[dim].changes:
            continue
        if io == "-":
            raise GrowthError(
                f"'{name}': axis {axis} is '{dim}' but {type(module).__name__} neither reads nor writes it"
            )
        out = maps[dim].read(out, axis) if io == "r" else maps[dim].write(out, axis)
    return out


def _sync_attributes(module: nn.Module) -> None:
    """The size attributes of a resized layer, from its new weights."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * int(module.groups)
    elif type(module).__name__ == "Conv1D":
        setattr(module, "nx", weight.shape[0])  # noqa: B010 - transformers' Conv1D sizes, not typed
        setattr(module, "nf", weight.shape[1])  # noqa: B010
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        module.normalized_shape = tuple(weight.shape)


def scale_eps(module: nn.Module, ratio: float) -> None:
    """Multiply a norm's epsilon by ``ratio`` (whatever its attribute is called)."""
    for attr in ("eps", "variance_epsilon", "epsilon"):
        if isinstance(getattr(module, attr, None), float):
            setattr(module, attr, getattr(module, attr) * ratio)


def resize(model: nn.Module, layout: Layout, maps_of: MapsOf) -> None:
    """Grow every parameter of ``model`` in place (shared parameters once, staying shared)."""
    grown: dict[int, nn.Parameter] = {}
    owners = dict(model.named_modules())
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        path, _, leaf = name.rpartition(".")
        module = owners[path]
        if id(param) not in grown:
            value = grow_tensor(name, param.detach(), module, leaf, layout, maps_of(name))
            grown[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
        setattr(module, leaf, grown[id(param)])
        _sync_attributes(module)
