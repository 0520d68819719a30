"""growth.wider on transformers: MLPs, and residual streams where their norms allow it (integer factors).

And net2wider on CNNs: a coupled group (residual stream, depthwise partner) widens as one, new units
copy weights and statistics, several sites widen each group once, grouped convs keep their groups, noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers
from helpers import X, same_output
from torch import nn

import growth
import surgery
from growth.check import output_change, vary_constant_weights
from growth.errors import GrowthError
from surgery.graph.inputs import Example

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


def test_sites_given_an_amount_list_only_where_the_op_takes_it() -> None:
    model, example, _ = _model("timm vit")
    graph = surgery.trace(model, example_input=example)
    every, by_half = (growth.sites(graph, "net2wider", example_input=example, factor=f) for f in (2.0, 1.5))
    assert every == growth.sites(graph, "net2wider", example_input=example)  # 2 goes everywhere
    assert "patch_embed.proj" in every and "patch_embed.proj" not in by_half  # the stream under LayerNorms
    assert "blocks.0.mlp.fc1" in by_half and set(by_half) < set(every)
    for site in every:
        if site not in by_half:
            with pytest.raises(GrowthError, match="give an integer factor"):
                growth.net2wider(graph, site, factor=1.5, example_input=example)
    # random growth draws an amount the site takes: every step of a ViT's growth applies and keeps the function
    grown, records = growth.mutate(graph, steps=4, seed=3, example_input=example, ops=["net2wider"])
    assert any(r.site not in by_half for r in records), records  # a stream site was drawn (with factor 2)
    change = output_change(model, grown, example)
    assert change.max_abs <= 1e-5 * change.scale, change


def test_widening_a_residual_writer_widens_the_whole_stream(resnet18: nn.Module) -> None:
    wide = growth.net2wider(resnet18, "layer2.0.conv2", factor=1.5, seed=0)
    for writer in ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"):
        assert wide.get_submodule(writer).out_channels == 192
    for norm in ("layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2"):
        assert wide.get_submodule(norm).num_features == 192
    for reader in ("layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"):
        assert wide.get_submodule(reader).in_channels == 192
    assert wide.get_submodule("layer2.0.conv1").out_channels == 128  # not coupled
    extra = 64  # new channels
    expected = extra * (128 * 9 + 64 + 128 * 9)  # rows of the three writers
    expected += 3 * 2 * extra  # their BatchNorms
    expected += extra * (128 * 9 + 256 * 9 + 256)  # columns of the three readers
    assert surgery.count_params(wide) - surgery.count_params(resnet18) == expected
    assert same_output(resnet18, wide, X)


def test_widening_mobilenet_project_conv_widens_the_residual_partner() -> None:
    net = surgery.build_model("mobilenet_v2").eval()
    wide = growth.net2wider(net, "features.3.conv.2", new_width=36, seed=0)
    assert wide.get_submodule("features.2.conv.2").out_channels == 36
    assert wide.get_submodule("features.4.conv.0.0").in_channels == 36
    assert same_output(net, wide, X)


def test_replicated_units_copy_weights_and_statistics(resnet18: nn.Module) -> None:
    wide = growth.net2wider(resnet18, "layer1.0.conv1", factor=1.5, seed=3)
    conv, bn, reader = (wide.get_submodule(p) for p in ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"))
    old_conv, old_bn, old_reader = (
        resnet18.get_submodule(p) for p in ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2")
    )
    assert torch.equal(conv.weight[:64], old_conv.weight)
    copies = [next(c for c in range(64) if torch.equal(conv.weight[j], old_conv.weight[c])) for j in range(64, 96)]
    for j, c in zip(range(64, 96), copies):
        assert torch.equal(bn.running_mean[j], old_bn.running_mean[c]) and torch.equal(
            bn.running_var[j], old_bn.running_var[c]
        )
    counts = torch.bincount(torch.tensor(copies), minlength=64) + 1
    for j, c in zip(range(64, 96), copies):
        assert torch.allclose(reader.weight[:, j], old_reader.weight[:, c] / counts[c])


def test_several_sites_widen_each_group_once(resnet18: nn.Module) -> None:
    wide = growth.net2wider(resnet18, ["layer2.0.conv2", "layer2.1.conv2", "layer1.0.conv1"], factor=1.5, seed=0)
    assert wide.get_submodule("layer2.1.conv2").out_channels == 192  # one group: widened once, not 288
    assert wide.get_submodule("layer1.0.conv1").out_channels == 96
    assert same_output(resnet18, wide, X)


def test_widen_every_conv_of_resnet50() -> None:
    net = surgery.build_model("resnet50").eval()
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    wide = growth.net2wider(net, convs, factor=1.5, seed=0)
    for name in convs:
        assert wide.get_submodule(name).out_channels == math.ceil(net.get_submodule(name).out_channels * 1.5)
    assert same_output(net, wide, X)


def test_grouped_convs_keep_new_channels_in_their_group() -> None:
    net = surgery.build_model("resnext50_32x4d").eval()
    with pytest.raises(GrowthError, match="not a multiple of 32"):
        growth.net2wider(net, "layer1.0.conv1", new_width=130)
    wide = growth.net2wider(net, "layer1.0.conv1", factor=1.5, seed=0)
    assert wide.get_submodule("layer1.0.conv2").in_channels == 192
    assert same_output(net, wide, X)


def test_noise_breaks_symmetry_and_keeps_the_function(resnet18: nn.Module) -> None:
    exact = growth.net2wider(resnet18, "layer1.0.conv1", factor=2.0, seed=0)
    noisy = growth.net2wider(resnet18, "layer1.0.conv1", factor=2.0, seed=0, noise=0.5)
    assert not torch.equal(exact.get_submodule("layer1.0.conv2").weight, noisy.get_submodule("layer1.0.conv2").weight)
    assert same_output(resnet18, noisy, X)
