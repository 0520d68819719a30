"""growth.wider on transformers: MLPs, and residual streams where their norms allow it (integer factors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import growth
import surgery
from growth.check import output_change, vary_constant_weights
from growth.errors import GrowthError
from surgery.inputs import Example

transformers.logging.set_verbosity_error()
TEXT = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 120}
TOKENS = Example(
    (), {"input_ids": torch.randint(1, 120, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
)
IMAGES = Example((torch.randn(2, 3, 32, 32),), {})
CASES = {  # model, example, sites to widen: (site, factor)
    "bert": (
        "hf:BertForSequenceClassification",
        {"config": TEXT},
        TOKENS,
        [("bert.embeddings.word_embeddings", 2.0), ("bert.encoder.layer.1.intermediate.dense", 1.5)],
    ),
    "llama": (
        "hf:LlamaForCausalLM",
        {"config": {**TEXT, "num_key_value_heads": 2}},
        TOKENS,
        [("model.embed_tokens", 3.0), ("model.layers.0.mlp.gate_proj", 1.5)],
    ),
    "gpt2": (
        "hf:GPT2LMHeadModel",
        {"config": {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 120}},
        TOKENS,
        [("transformer.h.1.mlp.c_fc", 1.5)],
    ),
    "timm vit": (
        "timm:vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 2},
        IMAGES,
        [("patch_embed.proj", 2.0), ("blocks.0.mlp.fc1", 1.25)],
    ),
}


def _model(name: str) -> tuple[torch.nn.Module, Example, list[tuple[str, float]]]:
    source, kwargs, example, sites = CASES[name]
    torch.manual_seed(0)
    model = vary_constant_weights(surgery.build_model(source, **kwargs).eval(), torch.Generator().manual_seed(0))
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False
    return model, example, sites


@pytest.mark.parametrize("name", sorted(CASES))
def test_widening_keeps_the_function(name: str, tmp_path: Path) -> None:
    model, example, sites = _model(name)
    grown = model
    for site, factor in sites:
        assert site in growth.sites(grown, "net2wider", example_input=example)
        grown = growth.net2wider(grown, site, factor=factor, seed=0, noise=0.1, example_input=example)
        change = output_change(model, grown, example)
        assert change.max_abs <= 1e-5 * change.scale, (site, change)
    assert surgery.count_params(grown) > surgery.count_params(model)
    surgery.save(grown.eval(), tmp_path / "grown")
    assert output_change(grown, surgery.load(tmp_path / "grown"), example).max_abs == 0.0


def test_a_stream_under_layer_norms_takes_integer_factors_only() -> None:
    model, example, _ = _model("bert")
    with pytest.raises(GrowthError, match=r"normalises over these channels.*give an integer factor"):
        growth.net2wider(model, "bert.embeddings.word_embeddings", factor=1.5, example_input=example)
    wide = growth.net2wider(model, "bert.embeddings.word_embeddings", new_width=96, seed=0, example_input=example)
    assert wide.bert.embeddings.word_embeddings.embedding_dim == 96
