"""Transformer growth (issue 28): more heads per layer (``net2wider`` at an attention site) and the uniform
``grow_transformer`` (heads, GQA groups, residual stream with tied embeddings, depth), on tiny models of each
family with noise on every parameter (unit gains and zero biases would hide bugs), each checked to keep the
function at float32 tolerance when called as users call it: other batch sizes and lengths, padding masks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
import transformers
from torch import nn

import growth
import surgery
from growth.errors import GrowthError

VOCAB = 64
RELATIVE = 1e-5  # max |change| <= RELATIVE x max |output|


def noisy(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with seeded noise added to every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
LLAMA |= {"num_hidden_layers": 2, "vocab_size": VOCAB}


def llama(**config: Any) -> nn.Module:
    return noisy(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA | config)))


def qwen2(**config: Any) -> nn.Module:
    return noisy(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLAMA | config)))


GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 32}
BERT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
BERT |= {"vocab_size": VOCAB, "max_position_embeddings": 32}


def gpt2(**config: Any) -> nn.Module:
    """Built by ``surgery.build_model``, so that its grown graphs have a recipe ``surgery.save`` can write."""
    return noisy(surgery.build_model("hf:GPT2LMHeadModel", config=GPT2 | config))


def bert(**config: Any) -> nn.Module:
    config = BERT | {"num_labels": 3} | config
    return noisy(transformers.BertForSequenceClassification(transformers.BertConfig(**config)))


def vit(**options: Any) -> nn.Module:
    return noisy(
        timm.create_model(
            "vit_tiny_patch16_224",
            **options,
            pretrained=False,
            img_size=32,
            patch_size=8,
            depth=2,
            embed_dim=32,
            num_heads=2,
            num_classes=5,
        )
    )


# family -> (its tiny model, the attention site of its first layer)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "llama": (llama, "model.layers.0.self_attn"),
    "qwen2": (qwen2, "model.layers.0.self_attn"),
    "gpt2": (gpt2, "transformer.h.0.attn"),
    "bert": (bert, "bert.encoder.layer.0.attention.self"),
    "vit": (vit, "blocks.0.attn"),
}
TEXT = ("llama", "qwen2", "gpt2", "bert")


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded(batch: int, length: int) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask whose first row is left-padded and second right-padded."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, : length // 3] = 0
    mask[1, -2:] = 0
    return {"input_ids": ids(batch, length), "attention_mask": mask}


def output(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    return getattr(y, "logits", y)


def assert_same_function(before: nn.Module, after: nn.Module, x: Any) -> None:
    y, z = output(before, x), output(after, x)
    assert z.shape == y.shape
    assert float((z - y).abs().max()) <= RELATIVE * float(y.abs().max())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], value) for name, value in before.items())


def query_rows(attention: nn.Module) -> int:
    """The rows of an attention module's query projection (GPT-2 and timm: a third of the fused projection)."""
    for name in ("q_proj", "query"):
        if hasattr(attention, name):
            return int(getattr(attention, name).weight.shape[0])
    if hasattr(attention, "c_attn"):
        return int(attention.c_attn.weight.shape[1]) // 3
    return int(attention.qkv.weight.shape[0]) // 3


def head_size(attention: nn.Module) -> int:
    return int(next(getattr(attention, n) for n in ("head_dim", "attention_head_size") if hasattr(attention, n)))


@functools.cache
def model_of(family: str) -> nn.Module:
    return FAMILIES[family][0]()


@functools.cache
def widened(family: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``net2wider`` x2 at the first layer's attention, traced with a padding mask for LLaMA and Qwen2, and the
    input model's state before the call."""
    model, site = model_of(family), FAMILIES[family][1]
    before = snapshot(model)
    example = padded(2, 7) if family in ("llama", "qwen2") else None
    return growth.net2wider(model, site, factor=2, seed=0, example_input=example, check=True), before


# --- heads, one layer at a time (net2wider at an attention site) --------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_net2wider_at_an_attention_site_doubles_its_heads_and_keeps_the_function(family: str) -> None:
    model, site = model_of(family), FAMILIES[family][1]
    wide, before = widened(family)
    assert isinstance(wide, torch.fx.GraphModule)
    assert_unchanged(model, before)
    grown, other = wide.get_submodule(site), wide.get_submodule(site.replace(".0.", ".1."))
    old = model.get_submodule(site)
    assert head_size(grown) == head_size(old)
    assert query_rows(grown) == 2 * query_rows(old) and query_rows(other) == query_rows(old)
    heads = getattr(grown, "num_heads", getattr(grown, "num_attention_heads", None))
    if heads is not None:
        assert query_rows(grown) == int(heads) * head_size(grown)
    if family == "vit":
        x: Any = torch.randn(3, 3, 32, 32)
    elif family in ("llama", "qwen2"):
        x = padded(3, 11)  # another batch size and length than the trace's, padding on both sides
    else:
        x = {"input_ids": ids(3, 11)}
    assert_same_function(model, wide, x)


def test_the_attention_modules_are_net2wider_sites() -> None:
    sites = growth.sites(model_of("vit"), "net2wider")
    assert {"blocks.0.attn", "blocks.1.attn", "blocks.0.mlp.fc1"} <= set(sites)


def test_a_graph_traced_without_a_mask_says_so_when_given_one() -> None:
    wide, _ = widened("gpt2")
    with pytest.raises(TypeError, match="attention_mask"):
        wide(**padded(2, 7))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_and_a_half_times_the_heads_where_whole_heads_result(family: str) -> None:
    """4 heads (GQA 4/2: whole groups, 6/3) or the ViT's 2 become 1.5 x; the module-level step of net2wider."""
    from growth.transformer.heads import grow_heads

    model, site = model_of(family), FAMILIES[family][1]
    grown = grow_heads(model, [site], 1.5, seed=3)
    assert query_rows(grown.get_submodule(site)) * 2 == 3 * query_rows(model.get_submodule(site))
    x = torch.randn(2, 3, 32, 32) if family == "vit" else {"input_ids": ids(2, 9)}
    assert_same_function(model, grown, x)
    if family in ("llama", "qwen2"):
        assert grown.get_submodule(site).k_proj.out_features == 3 * head_size(grown.get_submodule(site))
        assert_same_function(model, grown, padded(3, 10))


# --- grouped-query attention: every query head reads the copy of its own key-value group -------------------


def head_sources(new: torch.Tensor, old: torch.Tensor, size: int) -> list[int]:
    """For each head block of rows of ``new``, the head of ``old`` whose rows it equals."""
    blocks = old.view(-1, size, old.shape[-1])
    found = []
    for block in new.view(-1, size, new.shape[-1]):
        same = [k for k, b in enumerate(blocks) if torch.equal(b, block)]
        assert len(same) == 1
        found.append(same[0])
    return found


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (8, 4), (6, 3), (6, 2), (12, 6)])
def test_gqa_query_heads_read_the_copy_of_their_own_group(heads: int, kv_heads: int) -> None:
    model = model_of("llama")
    grown = growth.grow_transformer(model, num_attention_heads=heads, num_key_value_heads=kv_heads, seed=1)
    assert (grown.config.num_attention_heads, grown.config.num_key_value_heads) == (heads, kv_heads)
    for old_layer, layer in zip(model.model.layers, grown.model.layers, strict=True):
        a, b = old_layer.self_attn, layer.self_attn
        assert b.head_dim == a.head_dim == 8 and b.q_proj.out_features == heads * 8
        q = head_sources(b.q_proj.weight, a.q_proj.weight, 8)
        k = head_sources(b.k_proj.weight, a.k_proj.weight, 8)
        v = head_sources(b.v_proj.weight, a.v_proj.weight, 8)
        assert k == v and sorted(set(q)) == [0, 1, 2, 3] and sorted(set(k)) == [0, 1]
        for j, source in enumerate(q):  # the new group of query head j holds a copy of its old head's group
            assert k[j // (heads // kv_heads)] == source // 2
        for source in range(4):  # the output projection divides the copies: their columns sum to the old ones
            copies = [j for j, s in enumerate(q) if s == source]
            total = sum(b.o_proj.weight[:, j * 8 : (j + 1) * 8] for j in copies)
            assert torch.allclose(total, a.o_proj.weight[:, source * 8 : (source + 1) * 8], atol=1e-6)
    assert_same_function(model, grown, padded(3, 10))


# --- grow_transformer: heads, stream, tied embeddings -------------------------------------------------------


@pytest.mark.parametrize(
    "family, sizes",
    [
        ("llama", {"num_attention_heads": 8}),
        ("gpt2", {"width": 2}),  # GPT-2 and BERT derive the head size from hidden_size / heads: both grow
        ("bert", {"width": 2}),
        ("vit", {"num_attention_heads": 4}),
    ],
)
def test_grow_transformer_heads_keep_the_head_size_and_the_function(family: str, sizes: dict[str, Any]) -> None:
    model, site = model_of(family), FAMILIES[family][1]
    before = snapshot(model)
    grown = growth.grow_transformer(model, **sizes)
    assert type(grown) is type(model)
    assert_unchanged(model, before)
    for path in (site, site.replace(".0.", ".1.")):
        assert head_size(grown.get_submodule(path)) == head_size(model.get_submodule(path))
        assert query_rows(grown.get_submodule(path)) == 2 * query_rows(model.get_submodule(path))
    if family in TEXT:
        assert grown.config.num_attention_heads == 2 * model.config.num_attention_heads
        assert_same_function(model, grown, {"input_ids": ids(3, 13)})
        assert_same_function(model, grown, padded(3, 13))
    else:
        assert_same_function(model, grown, torch.randn(3, 3, 32, 32))


untied_llama = functools.partial(model_of, "llama")
# a large eps, so that one not rescaled with a padded stream moves the output beyond the tolerance
tied_llama = functools.cache(functools.partial(llama, tie_word_embeddings=True, rms_norm_eps=0.1))
large_eps_llama = functools.cache(functools.partial(llama, rms_norm_eps=0.1))
large_eps_gpt2 = functools.cache(functools.partial(gpt2, layer_norm_epsilon=0.1))


@pytest.mark.parametrize(
    "make, sizes",
    [
        (large_eps_gpt2, {"width": 2}),
        (large_eps_gpt2, {"hidden_size": 48, "num_attention_heads": 6}),
        (tied_llama, {"width": 2}),
        (tied_llama, {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3}),
        (large_eps_llama, {"hidden_size": 40}),  # RMSNorm, padded by 8 with the heads as they were
        (large_eps_llama, {"hidden_size": 48, "intermediate_size": 100}),
    ],
    ids=["gpt2-x2", "gpt2-48", "llama-tied-x2", "llama-tied-48", "llama-40", "llama-48"],
)
def test_the_residual_stream_widens_exactly_and_a_tied_head_stays_tied(
    make: Callable[[], nn.Module], sizes: dict[str, Any]
) -> None:
    model = make()
    (eps_key,) = [k for k in model.config.to_dict() if k.endswith(("_eps", "_epsilon"))]
    old_eps, before = getattr(model.config, eps_key), snapshot(model)
    grown = growth.grow_transformer(model, **sizes)
    assert_unchanged(model, before)
    hidden = grown.config.hidden_size
    assert hidden == sizes.get("hidden_size", 2 * model.config.hidden_size)
    assert grown.get_input_embeddings().weight.shape == (VOCAB, hidden)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (grown.get_output_embeddings().weight is grown.get_input_embeddings().weight) == tied
    ratio = 1.0 if hidden % model.config.hidden_size == 0 else model.config.hidden_size / hidden
    # the config's eps (from_pretrained builds the norms from it) and every norm's own
    assert getattr(grown.config, eps_key) == pytest.approx(old_eps * ratio, rel=1e-12)
    norms = [m for m in grown.modules() if type(m).__name__.endswith(("RMSNorm", "LayerNorm"))]
    eps = [getattr(m, "eps", getattr(m, "variance_epsilon", None)) for m in norms]
    assert norms and eps == pytest.approx([old_eps * ratio] * len(norms), rel=1e-12)
    assert_same_function(model, grown, {"input_ids": ids(3, 12)})
    assert_same_function(model, grown, padded(2, 9))


def test_a_vit_stream_pads_exactly_with_every_norm_rescaled() -> None:
    model = vit(norm_layer=functools.partial(nn.LayerNorm, eps=0.1))  # a large eps: a wrong one shows
    grown = growth.grow_transformer(model, hidden_size=40, num_hidden_layers=3)
    norms = [m for m in grown.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 3 + 1 and all(m.eps == pytest.approx(0.1 * 32 / 40) for m in norms)
    assert grown.embed_dim == grown.num_features == 40 and grown.pos_embed.shape[-1] == 40
    assert all(m.eps == 0.1 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert_same_function(model, grown, torch.randn(3, 3, 32, 32))


# --- depth ---------------------------------------------------------------------------------------------------


def writers(layer: nn.Module) -> list[torch.Tensor]:
    """The parameters of a layer that write to the residual stream: the attention's and the MLP's output."""
    modules = dict(layer.named_modules())
    names = ("self_attn.o_proj", "mlp.down_proj", "attn.c_proj", "mlp.c_proj")
    return [p for n in names if n in modules for p in modules[n].parameters()]


@pytest.mark.parametrize(
    "family, old, sizes, new",
    [
        ("llama", 4, {"depth": 2}, 8),
        ("llama", 4, {"num_hidden_layers": 5}, 5),
        ("qwen2", 4, {"num_hidden_layers": 6}, 6),
        ("gpt2", 2, {"depth": 2}, 4),
    ],
)
def test_new_layers_are_copies_that_write_nothing_and_learn(
    family: str, old: int, sizes: dict[str, Any], new: int
) -> None:
    if family == "qwen2":  # sliding-window layers after the second: the layer types follow their layers
        model = qwen2(num_hidden_layers=old, use_sliding_window=True, max_window_layers=2, sliding_window=4)
    elif family == "llama":
        model = llama(num_hidden_layers=old)
    else:
        model = model_of(family)
    grown = growth.grow_transformer(model, **sizes)
    assert type(grown) is type(model) and grown.config.num_hidden_layers == new
    layers, old_layers = _layers(grown), _layers(model)
    assert len(layers) == new
    fresh = [k for k, layer in enumerate(layers) if all(not p.any() for p in writers(layer))]
    assert len(fresh) == new - old and 0 not in fresh
    kept = [k for k in range(new) if k not in fresh]
    for k, source in zip(kept, old_layers, strict=True):  # the old layers, in their order
        assert all(torch.equal(a, b) for a, b in zip(layers[k].state_dict().values(), source.state_dict().values()))
    for k in fresh:  # a copy of the layer before it, but for its zeroed writers
        zeroed = {id(p) for p in writers(layers[k])}
        for (name, a), b in zip(layers[k].named_parameters(), layers[k - 1].parameters(), strict=True):
            assert id(a) in zeroed or torch.equal(a, b), name
    if family == "qwen2":
        types = grown.config.layer_types
        assert len(types) == new and [types[k] for k in kept] == model.config.layer_types
        assert "sliding_attention" in types and all(types[k] == types[k - 1] for k in fresh)
        assert [a.sliding_window for a in (layer.self_attn for layer in layers)] == [
            4 if t == "sliding_attention" else None for t in grown.config.layer_types
        ]
    assert_same_function(model, grown, padded(3, 10))
    loss = grown.train()(**padded(3, 10), labels=ids(3, 10)).loss
    loss.backward()
    for k in fresh:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in writers(layers[k]) if p.dim() == 2)
    optimizer = torch.optim.SGD(grown.parameters(), lr=0.1)
    optimizer.step()
    assert all(any(p.any() for p in writers(layers[k])) for k in fresh)


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


# --- refusals ------------------------------------------------------------------------------------------------


def mamba() -> nn.Module:
    config = transformers.MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=VOCAB, state_size=4)
    return transformers.MambaForCausalLM(config)


def resnet() -> nn.Module:
    return surgery.build_model("resnet18", num_classes=3)


@pytest.mark.parametrize(
    "make, sizes, message",
    [
        (functools.partial(model_of, "bert"), {"width": 1.5}, "integer factors only"),
        (functools.partial(model_of, "bert"), {"depth": 2}, "cannot start as an identity"),
        (functools.partial(model_of, "bert"), {"hidden_size": 48, "num_attention_heads": 6}, "integer factors"),
        (mamba, {"width": 2}, "no transformer layout for mamba"),
        (resnet, {"width": 2}, "no transformer layout for ResNet"),
        (untied_llama, {"num_attention_heads": 5}, "do not split into 2 key-value groups"),
        (untied_llama, {"num_attention_heads": 8, "num_key_value_heads": 8}, "neither"),
        (untied_llama, {"hidden_size": 16}, "smaller than the model's 32"),
        (untied_llama, {"num_hidden_layers": 1}, "smaller than the model's 2"),
        (untied_llama, {"width": 2, "hidden_size": 64}, "not both"),
        (untied_llama, {"width": 0.5}, "at least 1"),
        (untied_llama, {"width": 1.3}, "not a whole number"),
        (functools.partial(model_of, "gpt2"), {"hidden_size": 48}, "needs num_attention_heads=6"),
        (functools.partial(gpt2, scale_attn_by_inverse_layer_idx=True), {"depth": 2}, "grow its width only"),
    ],
)
def test_refusals_are_one_line(make: Callable[[], nn.Module], sizes: dict[str, Any], message: str) -> None:
    with pytest.raises(GrowthError, match=message) as refused:
        growth.grow_transformer(make(), **sizes)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "site, amount, message",
    [
        ("model.layers.0.self_attn", {"factor": 1.25}, "whole number of heads"),
        ("model.layers.0.self_attn", {"new_width": 64}, "give factor="),
    ],
)
def test_net2wider_refuses_heads_it_cannot_grow(site: str, amount: dict[str, Any], message: str) -> None:
    with pytest.raises(GrowthError, match=message) as refused:
        growth.net2wider(untied_llama(), site, seed=0, **amount)
    assert "\n" not in str(refused.value)
