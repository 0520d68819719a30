"""More attention heads in chosen layers: ``net2wider`` at an attention site (``model.layers.0.self_attn``).

New heads copy whole heads of their layer (query, key and value rows; with grouped-query
attention whole key-value groups, or more query heads per group), the output projection
divides the copies' columns, the head size is fixed, so the layer computes the same
function (exact up to float rounding). The rest of the model is untouched, so a model
whose layers now differ is no longer described by its config: ``net2wider`` gives it
back as a traced graph, as every op does; to keep a Hugging Face class, grow every layer
alike with :func:`growth.grow_transformer`.

>>> import torch, transformers, growth
>>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
...     num_key_value_heads=2, num_hidden_layers=2, vocab_size=64)
>>> model = transformers.LlamaForCausalLM(config).eval()
>>> [s for s in growth.sites(model, "net2wider") if s.endswith("self_attn")]
['model.layers.0.self_attn', 'model.layers.1.self_attn']
>>> wide = growth.net2wider(model, "model.layers.1.self_attn", factor=2, seed=0)
>>> wide.model.layers[1].self_attn.q_proj.out_features, wide.model.layers[0].self_attn.q_proj.out_features
(64, 32)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from growth.errors import GrowthError
from growth.transformer import maps as axis_maps
from growth.transformer.grow import check_grown
from growth.transformer.resize import MapsOf, resize
from surgery.channels.layouts import attention_heads, find_layout, layer_list


def head_sites(model: nn.Module) -> list[str]:
    """The attention modules of a model of a known family, as net2wider sites (none for a captured graph)."""
    layout = find_layout(model)
    if layout is None:
        return []
    path, layers = layer_list(model, layout)
    return [f"{path}.{i}.{layout.attention}" for i in range(len(layers))]


def head_counts(old_heads: int, old_kv: int, factor: float) -> tuple[int, int] | None:
    """``(query heads, key-value heads)`` after ``factor``: whole groups copied if that is whole, else more query
    heads per group; None if neither is a whole number of heads."""
    heads = old_heads * factor
    if abs(heads - round(heads)) > 1e-9:
        return None
    groups = old_kv * factor
    if abs(groups - round(groups)) < 1e-9:
        return round(heads), round(groups)
    return (round(heads), old_kv) if round(heads) % old_kv == 0 else None


def grow_heads(
    model: nn.Module,
    at: Sequence[str],
    factor: float,
    seed: int,
    example_input: object = None,
    check: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose attention modules ``at`` have ``factor`` x the heads (same function)."""
    layout = find_layout(model)
    known = head_sites(model)
    if layout is None or any(site not in known for site in at):
        bad = next(site for site in at if site not in known)
        raise GrowthError(f"'{bad}' is not an attention site of this model; its attention sites: {', '.join(known)}")
    grown = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    per_layer: dict[str, dict[str, axis_maps.AxisMap]] = {}
    for site in at:
        attention = grown.get_submodule(site)
        old_heads, old_kv, size = attention_heads(attention)
        counts = head_counts(old_heads, old_kv, factor)
        if counts is None:
            raise GrowthError(
                f"factor={factor} does not give a whole number of heads at '{site}' ({old_heads} query, "
                f"{old_kv} key-value heads); give a factor such as 2"
            )
        query, kv = axis_maps.heads(old_heads, old_kv, *counts, generator)
        q, kv = axis_maps.in_blocks(query, size), axis_maps.in_blocks(kv, size)
        layer = site.removesuffix("." + layout.attention) + "."
        per_layer[layer] = {"q": q, "kv": kv, "qkv": axis_maps.concat(q, kv, kv)}
        layout.set_heads(attention, *counts)
    resize(grown, layout, _maps_of(per_layer))
    if check:
        check_grown(model, grown, example_input, "net2wider")
    return grown


_STILL = axis_maps.AxisMap(torch.arange(0), torch.ones(0), 0)  # changes nothing: never applied
DIMENSIONS = ("h", "i", "p", "q", "kv", "qkv")


def _maps_of(per_layer: dict[str, dict[str, axis_maps.AxisMap]]) -> MapsOf:
    """Each parameter's maps: its layer's head maps when its heads grow, else maps that change nothing."""
    still = dict.fromkeys(DIMENSIONS, _STILL)

    def maps_of(name: str) -> dict[str, axis_maps.AxisMap]:
        return {**still, **next((m for prefix, m in per_layer.items() if name.startswith(prefix)), {})}

    return maps_of
