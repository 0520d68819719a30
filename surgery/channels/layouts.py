"""Which dimension of a transformer each axis of each of its parameters is, per family: one small table each.

A uniform change of a transformer's sizes (the hidden size, the MLP size, the number of
query and key-value heads, the number of layers) touches every parameter along the axes
that size spans. Shapes alone do not say which axis is which (a query projection of a
multi-head model is hidden x hidden, yet one axis is heads and the other the residual
stream), so each family states it once, here, Torch-Pruning style:

* ``h`` the residual stream (normalised: LayerNorm or RMSNorm), ``i`` the MLP's units,
  ``p`` other free units the config sizes by the hidden size (BERT's pooler),
* ``q`` query heads x head size, ``kv`` key-value heads x head size, ``qkv`` the three
  concatenated (GPT-2's ``c_attn``, timm's ``qkv``), ``-`` an axis no size change touches.

Parameters are named relative to the layer they sit in (``self_attn.q_proj.weight``) or
by the end of their path (``embed_tokens.weight``), so the prefix a model wraps them in
(``model.``, ``transformer.``, ``bert.``) is read from the model, never assumed.

>>> import transformers
>>> from surgery.channels.layouts import layout_of
>>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
...     num_key_value_heads=2, num_hidden_layers=2, vocab_size=64)
>>> model = transformers.LlamaForCausalLM(config)
>>> layout = layout_of(model)
>>> layout.name, layout.axes("model.layers.1.self_attn.k_proj.weight"), layout.axes("lm_head.weight")
('llama', ('kv', 'h'), ('-', 'h'))
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from surgery.core.errors import SurgeryError

Axes = tuple[str, ...]
HeadSetter = Callable[[Any, int, int], None]  # (attention module, query heads, key-value heads)


@dataclass(frozen=True)
class Layout:
    """One family: its parameters' axes, where its layers, attention and final norm are, its config's names.

    ``config`` maps the library's size names (``hidden``, ``intermediate``, ``heads``,
    ``kv_heads``, ``layers``) to the attribute a Hugging Face config spells them with.
    ``post_norm`` families normalise after each residual sum (BERT), so a zero-branch
    layer is not an identity there and a padded stream does not stay padded.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    layers: str  # the layer list's attribute name, the last part of its path
    layer_params: dict[str, Axes]
    top_params: dict[str, Axes]
    attention: str  # an attention module's path inside a layer
    final_norm: str  # the end of the path of the norm read by the output head (``norm``, ``transform.LayerNorm``)
    set_heads: HeadSetter
    config: dict[str, str] = field(default_factory=dict)
    post_norm: bool = False
    scaled_embedding: bool = False  # multiplies the embeddings by sqrt(hidden size) (Gemma)
    hidden_attrs: tuple[str, ...] = ()  # model attributes holding the hidden size (timm: embed_dim, ...)

    def split(self, name: str) -> tuple[str, int, str] | None:
        """``(prefix, layer index, name inside the layer)`` for a parameter in a layer, else None."""
        found = re.fullmatch(rf"(.*?\b{re.escape(self.layers)})\.(\d+)\.(.+)", name)
        return (found[1], int(found[2]), found[3]) if found else None

    def axes(self, name: str) -> Axes:
        """The dimension of each axis of parameter ``name``; a one-line error for a parameter the table lacks."""
        inside = self.split(name)
        if inside is not None and inside[2] in self.layer_params:
            return self.layer_params[inside[2]]
        for end, axes in self.top_params.items():
            if name == end or name.endswith("." + end):
                return axes
        raise SurgeryError(
            f"'{name}' is not in the {self.name} layout (surgery/channels/layouts.py): its axes are unknown, "
            "so its sizes cannot change; add it to the family's table"
        )


def _config_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", "")) if config is not None else ""


def _hf(*types: str) -> Callable[[nn.Module], bool]:
    return lambda model: _config_name(model) in types


def _set_llama(attention: Any, heads: int, kv_heads: int) -> None:
    attention.num_key_value_groups = heads // kv_heads
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attention, name):
            setattr(attention, name, heads)
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = kv_heads


def _set_gpt2(attention: Any, heads: int, kv_heads: int) -> None:
    attention.num_heads = heads
    attention.split_size = attention.embed_dim = heads * int(attention.head_dim)


def _set_bert(attention: Any, heads: int, kv_heads: int) -> None:
    attention.num_attention_heads = heads
    attention.all_head_size = heads * int(attention.attention_head_size)


def _set_timm(attention: Any, heads: int, kv_heads: int) -> None:
    attention.num_heads = heads
    attention.attn_dim = heads * int(attention.head_dim)


_LLAMA_LAYER: dict[str, Axes] = {
    "self_attn.q_proj.weight": ("q", "h"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "h"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "h"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("h", "q"),
    "self_attn.o_proj.bias": ("h",),
    "self_attn.q_norm.weight": ("-",),  # per head (Qwen3)
    "self_attn.k_norm.weight": ("-",),
    "mlp.gate_proj.weight": ("i", "h"),
    "mlp.up_proj.weight": ("i", "h"),
    "mlp.down_proj.weight": ("h", "i"),
    "input_layernorm.weight": ("h",),
    "post_attention_layernorm.weight": ("h",),
}
_HF_SIZES = {
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "layers": "num_hidden_layers",
}
_LM_TOP: dict[str, Axes] = {"lm_head.weight": ("-", "h"), "score.weight": ("-", "h")}

LAYOUTS: list[Layout] = [
    Layout(
        "llama",
        _hf("llama", "mistral", "qwen2", "qwen3"),
        "layers",
        _LLAMA_LAYER,
        {"embed_tokens.weight": ("-", "h"), "norm.weight": ("h",), **_LM_TOP},
        "self_attn",
        "norm",
        _set_llama,
        _HF_SIZES,
    ),
    Layout(
        "gemma",
        _hf("gemma"),
        "layers",
        _LLAMA_LAYER,
        {"embed_tokens.weight": ("-", "h"), "norm.weight": ("h",), **_LM_TOP},
        "self_attn",
        "norm",
        _set_llama,
        _HF_SIZES,
        scaled_embedding=True,
    ),
    Layout(
        "gpt2",
        _hf("gpt2"),
        "h",
        {
            "ln_1.weight": ("h",),
            "ln_1.bias": ("h",),
            "attn.c_attn.weight": ("h", "qkv"),
            "attn.c_attn.bias": ("qkv",),
            "attn.c_proj.weight": ("q", "h"),
            "attn.c_proj.bias": ("h",),
            "ln_2.weight": ("h",),
            "ln_2.bias": ("h",),
            "mlp.c_fc.weight": ("h", "i"),
            "mlp.c_fc.bias": ("i",),
            "mlp.c_proj.weight": ("i", "h"),
            "mlp.c_proj.bias": ("h",),
        },
        {
            "wte.weight": ("-", "h"),
            "wpe.weight": ("-", "h"),
            "ln_f.weight": ("h",),
            "ln_f.bias": ("h",),
            **_LM_TOP,
        },
        "attn",
        "ln_f",
        _set_gpt2,
        {**_HF_SIZES, "intermediate": "n_inner"},
    ),
    Layout(
        "bert",
        _hf("bert", "roberta"),
        "layer",
        {
            **{f"attention.self.{p}.weight": ("q", "h") for p in ("query", "key", "value")},
            **{f"attention.self.{p}.bias": ("q",) for p in ("query", "key", "value")},
            "attention.output.dense.weight": ("h", "q"),
            "attention.output.dense.bias": ("h",),
            "attention.output.LayerNorm.weight": ("h",),
            "attention.output.LayerNorm.bias": ("h",),
            "intermediate.dense.weight": ("i", "h"),
            "intermediate.dense.bias": ("i",),
            "output.dense.weight": ("h", "i"),
            "output.dense.bias": ("h",),
            "output.LayerNorm.weight": ("h",),
            "output.LayerNorm.bias": ("h",),
        },
        {
            **{f"embeddings.{p}_embeddings.weight": ("-", "h") for p in ("word", "position", "token_type")},
            "embeddings.LayerNorm.weight": ("h",),
            "embeddings.LayerNorm.bias": ("h",),
            "pooler.dense.weight": ("p", "h"),
            "pooler.dense.bias": ("p",),
            "classifier.weight": ("-", "p"),
            "classifier.bias": ("-",),
            "classifier.dense.weight": ("p", "h"),  # RoBERTa's head reads the first token itself
            "classifier.dense.bias": ("p",),
            "classifier.out_proj.weight": ("-", "p"),
            "classifier.out_proj.bias": ("-",),
            "cls.predictions.transform.dense.weight": ("h", "h"),  # the masked-LM head, tied to the embedding
            "cls.predictions.transform.dense.bias": ("h",),
            "cls.predictions.transform.LayerNorm.weight": ("h",),
            "cls.predictions.transform.LayerNorm.bias": ("h",),
            "cls.predictions.decoder.weight": ("-", "h"),
            "cls.predictions.decoder.bias": ("-",),
            "cls.predictions.bias": ("-",),
        },
        "attention.self",
        "predictions.transform.LayerNorm",
        _set_bert,
        {k: v for k, v in _HF_SIZES.items() if k != "kv_heads"},
        post_norm=True,
    ),
    Layout(
        "timm-vit",
        lambda model: type(model).__name__ == "VisionTransformer" and type(model).__module__.startswith("timm."),
        "blocks",
        {
            "norm1.weight": ("h",),
            "norm1.bias": ("h",),
            "attn.qkv.weight": ("qkv", "h"),
            "attn.qkv.bias": ("qkv",),
            "attn.proj.weight": ("h", "q"),
            "attn.proj.bias": ("h",),
            "norm2.weight": ("h",),
            "norm2.bias": ("h",),
            "mlp.fc1.weight": ("i", "h"),
            "mlp.fc1.bias": ("i",),
            "mlp.fc2.weight": ("h", "i"),
            "mlp.fc2.bias": ("h",),
        },
        {
            "cls_token": ("-", "-", "h"),
            "reg_token": ("-", "-", "h"),
            "pos_embed": ("-", "-", "h"),
            "patch_embed.proj.weight": ("h", "-", "-", "-"),
            "patch_embed.proj.bias": ("h",),
            "norm.weight": ("h",),
            "norm.bias": ("h",),
            "fc_norm.weight": ("h",),
            "fc_norm.bias": ("h",),
            "head.weight": ("-", "h"),
            "head.bias": ("-",),
        },
        "attn",
        "norm",
        _set_timm,
        hidden_attrs=("embed_dim", "num_features", "head_hidden_size"),
    ),
]


def find_layout(model: nn.Module) -> Layout | None:
    """The layout of ``model``'s family, or None."""
    return next((layout for layout in LAYOUTS if layout.matches(model)), None)


def layout_of(model: nn.Module) -> Layout:
    """The layout of ``model``'s family, or a one-line error naming the families that have one."""
    layout = find_layout(model)
    if layout is None:
        kind = _config_name(model) or type(model).__name__
        names = ", ".join(layout.name for layout in LAYOUTS)
        raise SurgeryError(
            f"no transformer layout for {kind} (families with one: {names}); "
            "grow it op by op with growth.net2wider / net2deeper instead"
        )
    return layout


def layer_list(model: nn.Module, layout: Layout) -> tuple[str, nn.ModuleList | nn.Sequential]:
    """The path and the module of ``model``'s layer stack (the ModuleList or Sequential named ``layout.layers``)."""
    found = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential))
        and path.rsplit(".", 1)[-1] == layout.layers
        and len(module)
    ]
    if len(found) != 1:
        raise SurgeryError(f"expected one layer list '{layout.layers}' in this {layout.name} model, found {len(found)}")
    return found[0]


def attention_heads(attention: Any) -> tuple[int, int, int]:
    """``(query heads, key-value heads, head size)`` of an attention module of a known family."""
    config: Any = getattr(attention, "config", None)
    size = next(int(getattr(attention, n)) for n in ("head_dim", "attention_head_size") if hasattr(attention, n))
    if config is not None and hasattr(attention, "num_key_value_groups"):  # LLaMA-style: counts come from shapes
        heads = attention.q_proj.out_features // size
        return heads, heads // int(attention.num_key_value_groups), size
    heads = next(int(getattr(attention, n)) for n in ("num_heads", "num_attention_heads") if hasattr(attention, n))
    return heads, heads, size
