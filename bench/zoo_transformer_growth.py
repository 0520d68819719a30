"""The transformers zoo's two ``grow_transformer`` columns: "heads" and "HF class kept".

"heads": ``growth.grow_transformer`` with twice the attention heads at a fixed head size. Where the
config derives the head size from ``hidden_size / num_attention_heads`` (GPT-2, BERT, RoBERTa: no
``head_dim`` in the config) twice the heads is twice the hidden size; where the config names ``head_dim``
(LLaMA, Mistral, Qwen2, Qwen3, Gemma) only the heads grow, key-value heads x2 too (the GQA group size
kept). "yes" when the output stays within 1e-5 x max |output| (grow_transformer's own check, measured
again here), else the one-line reason (a family without a transformer layout is refused by name).

"HF class kept": ``grow_transformer(model, width=2)`` is ``type(model)``, and ``save_pretrained`` then
``from_pretrained`` (safetensors, in a temporary directory) gives logits equal to the grown model's
(``torch.equal``). "n/a" for models that are not Hugging Face ``PreTrainedModel``s (timm).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
import transformers
from zoo_calls import TOLERANCE, first_tensor

import growth
from growth.check import output_change
from surgery.graph.inputs import Example

transformers.utils.logging.disable_progress_bar()  # save_pretrained / from_pretrained would draw bars per model


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def heads_sizes(model: torch.nn.Module) -> dict[str, Any]:
    """grow_transformer's arguments for twice the heads at the same head size (see the module docstring)."""
    config: Any = getattr(model, "config", None)
    if config is None:  # timm: num_heads of the first block, head size = embed_dim / num_heads
        first: Any = next(m for m in model.modules() if hasattr(m, "num_heads"))
        heads = int(first.num_heads)
        embed: Any = model.embed_dim
        return {"num_attention_heads": 2 * heads, "hidden_size": 2 * int(embed)}
    heads = int(config.num_attention_heads)
    if getattr(config, "head_dim", None) is not None:
        kv = getattr(config, "num_key_value_heads", None)
        return {"num_attention_heads": 2 * heads} | ({"num_key_value_heads": 2 * int(kv)} if kv else {})
    return {"num_attention_heads": 2 * heads, "hidden_size": 2 * int(config.hidden_size)}


def heads_column(model: torch.nn.Module, example: Example) -> tuple[str, str | None]:
    """("yes"/"moved"/"no", a note or None) for twice the heads at a fixed head size."""
    try:
        sizes = heads_sizes(model)
        grown = growth.grow_transformer(model, **sizes, example_input=example)
        change = output_change(model, grown, example)
    except Exception as e:  # noqa: BLE001 - a bench records refusals instead of stopping
        return "no", f"heads: {_reason(e)}"
    shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
    if change.max_abs <= TOLERANCE * change.scale:
        return f"yes ({shown})", None
    return "moved", f"heads ({shown}): output moved by {change.relative:.1e} of max |y|"


def class_kept_column(model: Any, example: Example) -> tuple[str, str | None]:
    """("yes"/"no"/"n/a", a note or None): width=2 keeps the HF class and survives save/from_pretrained."""
    if not hasattr(model, "save_pretrained"):
        return "n/a", None
    try:
        grown: Any = growth.grow_transformer(model, width=2, example_input=example).eval()
    except Exception as e:  # noqa: BLE001
        return "no (refused)", f"HF class kept: {_reason(e)}"
    if type(grown) is not type(model):
        return "no (class)", f"HF class kept: width=2 gave a {type(grown).__name__}, not a {type(model).__name__}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            grown.save_pretrained(tmp)
            cls: Any = type(model)
            loaded = cls.from_pretrained(tmp).eval()
        except Exception as e:  # noqa: BLE001
            return "no (save/load)", f"HF class kept: {_reason(e)}"
    with torch.no_grad():
        same = torch.equal(first_tensor(example(grown)), first_tensor(example(loaded)))
    if same:
        return "yes", None
    return "no (logits)", "HF class kept: from_pretrained's logits differ from the grown model's"
