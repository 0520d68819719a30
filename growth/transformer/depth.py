"""New transformer layers that start as identities: a copy of the layer before, its writes to the stream at zero.

In a pre-norm layer (``x + attn(norm(x))``, then ``+ mlp(norm(.))``) the only parameters
writing to the residual stream are the output projections of the attention and the MLP;
with them at zero the layer adds nothing, yet its other weights are a trained layer's,
and the projections' gradients are not zero, so it learns from the first step.

>>> from growth.transformer.depth import layer_sources
>>> layer_sources(4, 8), layer_sources(4, 5)
([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 2, 2, 3])
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from growth.transformer.resize import is_norm, writes_along
from surgery.channels.layouts import Layout, layer_list


def layer_sources(old: int, new: int) -> list[int]:
    """For each layer of the grown stack, the old layer it is (first time) or copies (after it), spread evenly."""
    extra = new - old
    after = [min(old - 1, (2 * t + 1) * old // (2 * extra)) for t in range(extra)] if extra else []
    sources: list[int] = []
    for layer in range(old):
        sources += [layer] * (1 + after.count(layer))
    return sources


def zero_writers(layer: nn.Module, layout: Layout) -> None:
    """Zero the weights and biases of every layer of ``layer`` writing to the residual stream (not its norms)."""
    for path, module in layer.named_modules():
        weight = getattr(module, "weight", None)
        if is_norm(module) or not isinstance(weight, torch.Tensor):
            continue
        name = f"{layout.layers}.0.{path}.weight"
        if "h" in writes_along(module, "weight", layout.axes(name)):
            with torch.no_grad():
                for param in module.parameters(recurse=False):
                    param.zero_()


def add_layers(model: nn.Module, layout: Layout, sources: list[int]) -> None:
    """Make ``model``'s layer stack ``[layer[s] for s in sources]``, each repeat a zero-writing copy."""
    path, layers = layer_list(model, layout)
    if len(sources) == len(layers):
        return
    stack, seen = [], set()
    for source in sources:
        if source in seen:
            new = copy.deepcopy(layers[source])
            zero_writers(new, layout)
            stack.append(new)
        else:
            seen.add(source)
            stack.append(layers[source])
    parent, _, attr = path.rpartition(".")
    rebuilt = nn.Sequential(*stack) if isinstance(layers, nn.Sequential) else nn.ModuleList(stack)
    setattr(model.get_submodule(parent) if parent else model, attr, rebuilt)
