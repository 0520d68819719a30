"""A resized transformer's weights back in the model's own class: the Hugging Face config that describes them.

Growth and slimming change a transformer's sizes; when every layer changed alike, a
config describes the result, and the model's own class built from it holds the new
weights exactly: ``save_pretrained``, ``from_pretrained`` and ``generate`` work as for
any model of that family. :func:`sizes_in` reads the sizes from the weights (by the
family's layout), :func:`rebuilt` builds the class and loads them.

>>> import torch, transformers, surgery
>>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
...     num_key_value_heads=2, num_hidden_layers=2, vocab_size=64)
>>> llama = transformers.LlamaForCausalLM(config).eval()
>>> small = surgery.slim(llama, 0.5).extract()  # slimming keeps the heads, the head size is explicit
>>> type(small).__name__, small.config.hidden_size, small.config.intermediate_size
('LlamaForCausalLM', 16, 32)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from surgery.channels.layouts import Layout, attention_heads, find_layout, layer_list
from surgery.core.errors import SurgeryError

SIZE_NAMES = ("hidden", "intermediate", "heads", "kv_heads", "layers")


def head_size(like: nn.Module, layout: Layout) -> int:
    """The head size of ``like``'s attention (growth and slimming keep it)."""
    _, layers = layer_list(like, layout)
    return attention_heads(layers[0].get_submodule(layout.attention))[2]


def sizes_in(like: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The sizes (``hidden``, ``intermediate``, ``heads``, ``kv_heads``, ``layers``) the weights ``state`` have,
    read with ``like``'s layout; a one-line error when the layers differ or the weights are not of that family."""
    layout = find_layout(like)
    if layout is None:
        raise SurgeryError(f"{type(like).__name__} has no transformer layout")
    found: dict[str, set[int]] = {dim: set() for dim in ("h", "i", "q", "kv", "qkv", "p")}
    layers = set()
    for name, tensor in state.items():
        inside = layout.split(name)
        if inside is not None:
            layers.add(inside[1])
        for dim, size in zip(layout.axes(name), tensor.shape):
            if dim in found:
                found[dim].add(int(size))
    size = head_size(like, layout)
    query = found["q"] | {s // 3 for s in found["qkv"]}  # the fused layouts of this table hold q, k, v alike
    kv = found["kv"] or query
    values = {"hidden": found["h"], "intermediate": found["i"], "heads": query, "kv_heads": kv}
    differ = [dim for dim, sizes in values.items() if len(sizes) != 1]
    if differ:
        raise SurgeryError(f"the layers differ in {', '.join(differ)}: no single config describes them")
    sizes = {dim: next(iter(v)) for dim, v in values.items()}
    return {**sizes, "heads": sizes["heads"] // size, "kv_heads": sizes["kv_heads"] // size, "layers": len(layers)}


def rebuilt(
    like: nn.Module, state: Mapping[str, torch.Tensor], sizes: Mapping[str, int], **config_changes: Any
) -> nn.Module:
    """``type(like)`` built from ``like``'s config at ``sizes`` (plus ``config_changes``), holding ``state``."""
    layout = find_layout(like)
    config = copy.deepcopy(getattr(like, "config", None))
    if layout is None or config is None or not hasattr(config, "to_dict"):
        raise SurgeryError(f"{type(like).__name__} is not a Hugging Face model of a family with a layout")
    size = head_size(like, layout)
    if not hasattr(config, "head_dim") and sizes["hidden"] != sizes["heads"] * size:
        raise SurgeryError(
            f"{layout.name} takes its head size from hidden_size / num_attention_heads, and {sizes['hidden']} / "
            f"{sizes['heads']} is not the head size {size}: no config describes these weights"
        )
    for ours, theirs in layout.config.items():
        value = sizes[ours]
        if ours == "kv_heads" and not hasattr(config, theirs):
            continue
        if ours == "intermediate" and getattr(config, theirs, None) is None and value == 4 * sizes["hidden"]:
            continue  # GPT-2's n_inner=None means 4 x hidden
        setattr(config, theirs, value)
    if hasattr(config, "head_dim"):
        config.head_dim = size
    for key, value in config_changes.items():
        setattr(config, key, value)
    param = next(like.parameters())
    with torch.device(param.device):
        model = type(like)(config)
    model = model.to(param.dtype)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    try:
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1].strip()
        raise SurgeryError(f"the weights do not fit a {type(like).__name__} of those sizes: {last}") from None
    if unexpected or set(missing) - tied:
        raise SurgeryError(
            f"the weights do not fit a {type(like).__name__}: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return model.train(like.training)


def as_own_class(like: nn.Module, resized: nn.Module, **config_changes: Any) -> nn.Module:
    """``resized`` (a graph or a modified copy of ``like``) as ``type(like)``, when one config describes it."""
    params = {name for name, _ in resized.named_parameters(remove_duplicate=False)}
    state = {k: v for k, v in resized.state_dict().items() if k in params}
    return rebuilt(like, state, sizes_in(like, state), **config_changes)
