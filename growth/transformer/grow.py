"""Grow a whole transformer uniformly and get the same class back: wider stream, MLP, more heads, more layers.

``grow_transformer`` is the Hugging Face (and timm ViT) user's growth: every layer
changes the same way, so the result is the model's own class with a bigger config
(``LlamaForCausalLM`` stays a ``LlamaForCausalLM``) that ``save_pretrained`` writes,
``from_pretrained`` reads back and ``generate`` runs, computing the same function:

* new heads copy whole heads (query, key, value; key-value groups consistently), the
  output projection divides the copies, the head size is fixed (bert2BERT, HyperCloning);
* the MLP copies units and the down projection divides them (Net2Net);
* the residual stream is copied by integer factors, and padded for any other width with
  the norms' gains and eps rescaled (LEMON), which is exact as well; an input embedding
  tied to the output head stays tied (with copies the final norm takes the factor);
* new layers are copies of the layer before them with their output projections at zero,
  so each is an identity (pre-norm families; BERT's post-norm is refused).

>>> import torch, transformers, growth
>>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
...     num_key_value_heads=2, num_hidden_layers=2, vocab_size=64)
>>> small = transformers.LlamaForCausalLM(config).eval()
>>> big = growth.grow_transformer(small, width=2, depth=2).eval()
>>> type(big).__name__, big.config.hidden_size, big.config.num_key_value_heads, big.config.num_hidden_layers
('LlamaForCausalLM', 64, 4, 4)
>>> ids = torch.randint(0, 64, (2, 7))
>>> bool((big(ids).logits - small(ids).logits).abs().max() < 1e-5)
True
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from growth.errors import GrowthError
from growth.transformer import maps as axis_maps
from growth.transformer.depth import add_layers, layer_sources
from growth.transformer.resize import is_norm, norm_kind, resize, scale_eps
from surgery.channels.layouts import Layout, attention_heads, layer_list, layout_of
from surgery.channels.rebuild import rebuilt
from surgery.core.errors import SurgeryError
from surgery.graph.inputs import Example, default_example

TOLERANCE = 1e-5  # relative to the largest output


@dataclass(frozen=True)
class Sizes:
    """A transformer's sizes, as its config names them (plus the head size, which growth keeps)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    head_dim: int


def sizes_of(model: nn.Module, layout: Layout) -> Sizes:
    """Read the sizes from the model's parameters and layers (every layer must agree)."""
    _, layers = layer_list(model, layout)
    per_layer: set[tuple[tuple[int, int, int], tuple[int, ...]]] = set()
    for layer in layers:
        counts = attention_heads(layer.get_submodule(layout.attention))
        inner = sorted(_sizes(layout, ((f"0.{n}", p) for n, p in layer.named_parameters()), "i"))
        per_layer.add((counts, tuple(inner)))
    if len(per_layer) != 1:
        raise GrowthError(
            "the layers differ in heads or MLP size (grown op by op?); grow_transformer grows uniform models"
        )
    (heads, kv_heads, head_dim), units = next(iter(per_layer))
    hidden = _sizes(layout, model.named_parameters(), "h")
    if len(hidden) != 1 or len(units) != 1:
        raise GrowthError(f"cannot read one hidden size and one MLP size from this {layout.name} model")
    return Sizes(hidden.pop(), units[0], heads, kv_heads, len(layers), head_dim)


def _sizes(layout: Layout, named: Iterable[tuple[str, torch.Tensor]], dim: str) -> set[int]:
    """The sizes of every axis of dimension ``dim`` among the parameters ``named``."""
    return {size for name, param in named if (size := _size(layout, name, param, dim)) is not None}


def _size(layout: Layout, name: str, param: torch.Tensor, dim: str) -> int | None:
    name = f"{layout.layers}.{name}" if name.startswith("0.") else name
    try:
        axes = layout.axes(name)
    except SurgeryError as e:
        raise GrowthError(str(e)) from None
    return next((int(param.shape[k]) for k, d in enumerate(axes) if d == dim), None)


def target_sizes(old: Sizes, width: float | None, depth: float | None, given: dict[str, int | None]) -> Sizes:
    """The sizes asked for: explicit ones, else ``width`` x (hidden, MLP, heads) and ``depth`` x layers."""
    scaled: dict[str, int] = {}
    for factor, names in (
        (width, ("hidden_size", "intermediate_size", "num_attention_heads")),
        (depth, ("num_hidden_layers",)),
    ):
        if factor is None:
            continue
        if not factor >= 1:
            raise GrowthError(f"a growth factor must be at least 1, got {factor}")
        for name in names:
            value = getattr(old, name) * factor
            if abs(value - round(value)) > 1e-9:
                raise GrowthError(f"{factor} x {name}={getattr(old, name)} is not a whole number; give {name} itself")
            scaled[name] = round(value)
    if width is not None and "num_attention_heads" in scaled:  # key-value heads keep the group size
        scaled["num_key_value_heads"] = scaled["num_attention_heads"] // (
            old.num_attention_heads // old.num_key_value_heads
        )
    for name, value in given.items():
        if value is not None:
            if name in scaled:
                raise GrowthError(f"give {name} or a factor that sets it (width/depth), not both")
            scaled[name] = int(value)
    if (
        "num_attention_heads" in scaled
        and "num_key_value_heads" not in scaled
        and old.num_key_value_heads == old.num_attention_heads
    ):
        scaled["num_key_value_heads"] = scaled["num_attention_heads"]  # multi-head attention stays multi-head
    new = replace(old, **scaled)
    for name in scaled:
        if getattr(new, name) < getattr(old, name):
            raise GrowthError(
                f"{name}={getattr(new, name)} is smaller than the model's {getattr(old, name)}; growth only grows"
            )
    return new


def _final_norm(model: nn.Module, layout: Layout) -> nn.Module | None:
    if not layout.final_norm:
        return None
    end = layout.final_norm
    found = [m for path, m in model.named_modules() if (path == end or path.endswith("." + end)) and is_norm(m)]
    return found[0] if len(found) == 1 else None


def _tied(model: nn.Module) -> bool:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return False
    head, embedding = get_out(), get_in()
    return head is not None and embedding is not None and head.weight is embedding.weight


def _check_allowed(model: nn.Module, layout: Layout, old: Sizes, new: Sizes) -> None:
    config = getattr(model, "config", None)
    if (
        config is not None
        and not hasattr(config, "head_dim")
        and new.hidden_size != new.num_attention_heads * old.head_dim
    ):
        raise GrowthError(
            f"{layout.name} derives its head size from hidden_size / num_attention_heads: keeping heads of "
            f"{old.head_dim}, hidden_size={new.hidden_size} needs "
            f"num_attention_heads={new.hidden_size / old.head_dim:g}"
        )
    if new.hidden_size != old.hidden_size and layout.scaled_embedding:
        raise GrowthError(
            f"{layout.name} scales its embeddings by sqrt(hidden_size); its hidden size does not grow yet"
        )
    if new.hidden_size % old.hidden_size and layout.post_norm:
        raise GrowthError(
            f"{layout.name} normalises after each residual sum: its stream widens by integer factors only "
            f"(hidden_size a multiple of {old.hidden_size})"
        )
    if new.num_hidden_layers != old.num_hidden_layers and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise GrowthError(
            f"this {layout.name} scales each layer's attention by 1 / (its index + 1) "
            "(scale_attn_by_inverse_layer_idx), so new layers would change the old ones' scales; grow its width only"
        )
    if new.num_hidden_layers != old.num_hidden_layers and layout.post_norm:
        raise GrowthError(
            f"{layout.name} normalises after each residual sum, so a new layer cannot start as an identity; "
            "grow its width only"
        )


def axis_maps_for(model: nn.Module, layout: Layout, old: Sizes, new: Sizes, seed: int) -> dict[str, axis_maps.AxisMap]:
    """The map of every dimension, from ``old`` to ``new`` sizes (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    final = _final_norm(model, layout)
    kind = norm_kind(final) if final is not None else "layer"
    query, kv = axis_maps.heads(
        old.num_attention_heads, old.num_key_value_heads, new.num_attention_heads, new.num_key_value_heads, generator
    )
    q, kv = axis_maps.in_blocks(query, old.head_dim), axis_maps.in_blocks(kv, old.head_dim)
    return {
        "h": axis_maps.stream(old.hidden_size, new.hidden_size, kind),
        "i": axis_maps.free_units(old.intermediate_size, new.intermediate_size, generator),
        "p": axis_maps.free_units(old.hidden_size, new.hidden_size, generator),
        "q": q,
        "kv": kv,
        "qkv": axis_maps.concat(q, kv, kv),
    }


def grow_transformer(
    model: nn.Module,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    num_hidden_layers: int | None = None,
    width: float | None = None,
    depth: float | None = None,
    seed: int = 0,
    example_input: Any = None,
    check: bool = True,
) -> nn.Module:
    """``model`` grown uniformly, as its own class (a new config for Hugging Face models); ``model`` is not modified.

    Args:
        model: a Hugging Face LLaMA / Mistral / Qwen2 / Qwen3 / Gemma / GPT-2 / BERT / RoBERTa
            model or a timm VisionTransformer (the families of :mod:`surgery.channels.layouts`).
        hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, num_hidden_layers:
            the new sizes, named as Hugging Face configs name them (timm: ``embed_dim``,
            the MLP's width, ``num_heads``, ``depth``); any left out stays.
        width: shorthand: multiply the hidden size, the MLP and the heads (key-value heads
            keep their group size) by ``width``; the head size never changes.
        depth: shorthand: multiply the number of layers by ``depth``.
        seed: which units extra copies are drawn from.
        example_input: the input the check runs (default: the model's own, guessed).
        check: run both models and raise if the output moved by more than 1e-5 x max |output|.

    >>> import transformers, growth
    >>> config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    >>> big = growth.grow_transformer(transformers.GPT2LMHeadModel(config), width=1.5)
    >>> big.config.n_embd, big.config.n_head, big.lm_head.weight is big.transformer.wte.weight
    (48, 6, True)
    """
    try:
        layout = layout_of(model)
    except SurgeryError as e:
        raise GrowthError(str(e)) from None
    old = sizes_of(model, layout)
    given = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "num_hidden_layers": num_hidden_layers,
    }
    new = target_sizes(old, width, depth, given)
    _check_allowed(model, layout, old, new)
    maps = axis_maps_for(model, layout, old, new, seed)
    grown = copy.deepcopy(model)
    resize(grown, layout, lambda name: maps)
    _finish_stream(grown, layout, maps["h"])
    _, layers = layer_list(grown, layout)
    for layer in layers:
        layout.set_heads(layer.get_submodule(layout.attention), new.num_attention_heads, new.num_key_value_heads)
    sources = layer_sources(old.num_hidden_layers, new.num_hidden_layers)
    add_layers(grown, layout, sources)
    result = _as_own_class(model, grown, new, maps["h"], sources)
    if check:
        check_grown(model, result, example_input, "grow_transformer")
    return result


def _finish_stream(grown: nn.Module, layout: Layout, hidden: axis_maps.AxisMap) -> None:
    """What the stream's growth asks beyond the weights: eps of padded norms, the tied head's factor, timm's sizes."""
    ratio = hidden.old / hidden.new
    if hidden.padded:
        for module in grown.modules():
            if is_norm(module):
                scale_eps(module, ratio)
    elif hidden.changes and _tied(grown):  # the head reads k copies through a weight it cannot divide
        final = _final_norm(grown, layout)
        if final is None:
            raise GrowthError(
                f"the {layout.name} output head shares the embedding but no final norm was found to scale"
            )
        with torch.no_grad():
            for param in final.parameters(recurse=False):
                param.mul_(ratio)
    for attr in layout.hidden_attrs:
        if hasattr(grown, attr):
            setattr(grown, attr, hidden.new)


def _as_own_class(
    model: nn.Module, grown: nn.Module, new: Sizes, hidden: axis_maps.AxisMap, sources: list[int]
) -> nn.Module:
    """A Hugging Face model rebuilt as its class from the grown config with the grown weights; else ``grown``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return grown
    changes: dict[str, Any] = {}
    if hidden.padded:
        for key, value in config.to_dict().items():
            if key.endswith(("_eps", "_epsilon")) and isinstance(value, float):
                changes[key] = value * hidden.old / hidden.new
    if isinstance(getattr(config, "layer_types", None), list):
        changes["layer_types"] = [config.layer_types[s] for s in sources]
    sizes = {
        "hidden": new.hidden_size,
        "intermediate": new.intermediate_size,
        "heads": new.num_attention_heads,
        "kv_heads": new.num_key_value_heads,
        "layers": new.num_hidden_layers,
    }
    try:
        return rebuilt(model, grown.state_dict(), sizes, **changes)
    except SurgeryError as e:
        raise GrowthError(f"the grown {type(model).__name__} does not fit its class ({e}); this is a bug") from None


def _main_output(value: Any) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if isinstance(getattr(value, attr, None), torch.Tensor):
            return getattr(value, attr)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise GrowthError(f"cannot find the output tensor of a {type(value).__name__} to check")


def output_change(before: nn.Module, after: nn.Module, example_input: Any = None) -> tuple[float, float]:
    """``(max |after - before|, max |before|)`` of the main output (logits), both in eval mode.

    A model without a head outputs the stream itself, which widens: the grown stream holds the
    old channels first (copies and padding come after them), and those are compared.
    """
    example = Example.of(example_input) or default_example(before, batch=2)
    modes = before.training, after.training
    before.eval(), after.eval()
    try:
        with torch.no_grad():
            y, z = _main_output(example(before)), _main_output(example(after))
    finally:
        before.train(modes[0]), after.train(modes[1])
    if y.dim() and y.shape[:-1] == z.shape[:-1] and z.shape[-1] > y.shape[-1]:  # the stream: its old channels
        z = z[..., : y.shape[-1]]
    if y.shape != z.shape:
        return float("inf"), float(y.abs().max())
    return float((z - y).abs().max()), float(y.abs().max())


def check_grown(before: nn.Module, after: nn.Module, example_input: Any, op: str) -> None:
    change, scale = output_change(before, after, example_input)
    if not change <= TOLERANCE * max(scale, 1e-12):
        raise GrowthError(
            f"{op} moved the output by {change:.3g} (max |y| = {scale:.3g}), beyond {TOLERANCE:g} x max |y|; "
            "this is a bug, please report it"
        )
