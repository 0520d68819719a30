"""growth.block: a residual block copied after itself with zero branches keeps the function, in every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import growth
import surgery
from growth.check import output_change, vary_constant_weights
from growth.errors import GrowthError
from surgery.graph.inputs import Example

transformers.logging.set_verbosity_error()
TEXT = {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 120}
TOKENS = Example(
    (), {"input_ids": torch.randint(1, 120, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
)
MODELS = {
    "gpt2": (
        "hf:GPT2LMHeadModel",
        {"config": {"n_layer": 3, "n_embd": 32, "n_head": 4, "vocab_size": 120, "n_positions": 64}},
        "transformer.h.1",
        TOKENS,
    ),
    "llama": ("hf:LlamaForCausalLM", {"config": {**TEXT, "num_key_value_heads": 2}}, "model.layers.1", TOKENS),
    "timm vit": (
        "timm:vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 3},
        "blocks.1",
        Example((torch.randn(2, 3, 32, 32),), {}),
    ),
    "convnext": ("convnext_tiny", {}, "features.5.4", Example((torch.randn(2, 3, 64, 64),), {})),
    "pre-activation resnet": ("timm:resnetv2_50", {}, "stages.1.blocks.2", Example((torch.randn(2, 3, 64, 64),), {})),
    "resnet (ReLU after the sum)": ("resnet18", {}, "layer3.1", Example((torch.randn(2, 3, 64, 64),), {})),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def grown(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, torch.nn.Module, Example]:
    source, kwargs, site, example = MODELS[request.param]
    torch.manual_seed(0)
    model = vary_constant_weights(surgery.build_model(source, **kwargs).eval(), torch.Generator().manual_seed(0))
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False
    assert site in growth.sites(model, "net2deeper", example_input=example, kind="block")
    return request.param, model, growth.net2deeper(model, site, kind="block", example_input=example), example


def test_the_copy_keeps_the_function(grown) -> None:
    name, model, deeper, example = grown
    change = output_change(model, deeper, example)
    assert change.max_abs <= 1e-5 * change.scale, (name, change)
    assert surgery.count_params(deeper) > surgery.count_params(model)


def test_the_copy_trains_and_reloads(grown, tmp_path: Path) -> None:
    name, model, deeper, example = grown
    deeper.train()
    out = example(deeper)
    loss = (out.logits if hasattr(out, "logits") else out).float().pow(2).mean()
    loss.backward()
    copies = [p for n, p in deeper.named_parameters() if "net2deeper" in n]
    assert copies and any(p.grad is not None and p.grad.abs().sum() > 0 for p in copies)  # the new block learns
    deeper.zero_grad(set_to_none=True)
    surgery.save(deeper.eval(), tmp_path / "grown")
    again = surgery.load(tmp_path / "grown").eval()
    assert output_change(deeper, again, example).max_abs == 0.0


def test_post_norm_blocks_are_refused_with_the_reason() -> None:
    bert = surgery.build_model("hf:BertForSequenceClassification", config=TEXT).eval()
    with pytest.raises(GrowthError, match=r"follows its residual sum \(post-norm\)"):
        growth.net2deeper(bert, "bert.encoder.layer.1", kind="block", example_input=TOKENS)


IMAGE = Example((torch.randn(2, 3, 32, 32),), {})
LISTED = {
    "llama": ("hf:LlamaForCausalLM", {"config": {**TEXT, "num_key_value_heads": 2}}, TOKENS),
    "hf vit": ("hf:ViTForImageClassification", {"config": {**TEXT, "image_size": 32, "patch_size": 8}}, IMAGE),
    "timm vit": ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}, IMAGE),
    "timm convnext": ("timm:convnext_atto", {"depths": (1, 1, 2, 1), "dims": (8, 16, 24, 32)}, IMAGE),
}


@pytest.mark.parametrize("family", sorted(LISTED))
def test_sites_lists_block_sites_and_each_keeps_the_function(family: str) -> None:
    source, kwargs, example = LISTED[family]
    torch.manual_seed(0)
    model = vary_constant_weights(surgery.build_model(source, **kwargs).eval(), torch.Generator().manual_seed(0))
    found = growth.sites(model, "net2deeper", example_input=example)  # every kind when none is given
    blocks = [s for s in found if s.args == {"kind": "block"}]
    graph = surgery.trace(model, example_input=example)  # captured once: growing a graph does not capture again
    assert blocks == growth.sites(graph, "net2deeper", example_input=example, kind="block")
    assert len(blocks) >= 3, (family, found)
    for site in blocks:
        deeper = growth.net2deeper(graph, site, **site.args, example_input=example)
        change = output_change(model, deeper, example)
        assert change.max_abs <= 1e-5 * change.scale, (family, site, change)


def test_blocks_with_an_activation_after_the_sum_say_which() -> None:
    csp = surgery.build_model("timm:cspresnet50").eval()  # LeakyReLU after each sum, and its input can be negative
    assert growth.sites(csp, "net2deeper", example_input=IMAGE, kind="block") == []
    with pytest.raises(GrowthError, match=r"stages.1.blocks.1.act3 \(the identity only on values >= 0\) follows"):
        growth.net2deeper(csp, "stages.1.blocks.1", kind="block", example_input=IMAGE)
    convnext = surgery.build_model("timm:convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)).eval()
    with pytest.raises(GrowthError, match="its output is its input"):  # an nn.Identity is no block
        growth.net2deeper(convnext, "stages.1.blocks.0.shortcut", kind="block", example_input=IMAGE)


def test_random_growth_draws_block_sites_and_keeps_the_function() -> None:
    source, kwargs, example = LISTED["llama"]
    torch.manual_seed(0)
    model = vary_constant_weights(surgery.build_model(source, **kwargs).eval(), torch.Generator().manual_seed(0))
    graph = surgery.trace(model, example_input=example)
    grown, records = growth.mutate(graph, steps=2, seed=0, example_input=example, ops=["net2deeper"])
    assert [r.args for r in records] == [{"kind": "block"}] * 2  # the only kind a LLaMA has
    change = output_change(model, grown, example)
    assert change.max_abs <= 1e-5 * change.scale, change
