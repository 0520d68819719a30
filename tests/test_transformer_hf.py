"""A grown (or slimmed) Hugging Face transformer is its own class again: ``save_pretrained`` /
``from_pretrained`` give it back bit for bit, ``generate`` continues as the model itself does, a model
without a head keeps its old channels first, a per-layer heads graph saves with ``surgery.save``, and the
``growth mutate hf:DIR --set KEY=VALUE --out DIR2`` command writes what :func:`growth.grow_transformer` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_transformer_growth import BERT, GPT2, LLAMA, RELATIVE, bert, gpt2, ids, llama, noisy, output, padded, widened
from torch import nn

import growth
import surgery

NO_SPECIAL_TOKENS = {"bos_token_id": None, "eos_token_id": None}  # generate runs the 8 tokens asked for


def causal_llama() -> nn.Module:
    return llama(**NO_SPECIAL_TOKENS)


def causal_gpt2() -> nn.Module:
    return gpt2(**NO_SPECIAL_TOKENS)


def bert_mlm() -> nn.Module:
    """A masked-LM BERT: its head's decoder is the word embedding (tied) behind a dense layer and a LayerNorm."""
    return noisy(transformers.BertForMaskedLM(transformers.BertConfig(**BERT)))


def tied(model: nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def continuation(model: nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The greedy continuation by repeated calls of the model on the whole sequence."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            step = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[:, -1].argmax(-1)
            tokens = torch.cat([tokens, step[:, None]], dim=1)
    return tokens


def reloaded(model: nn.Module, directory: Path) -> nn.Module:
    model.save_pretrained(directory)
    return type(model).from_pretrained(directory, use_safetensors=True).eval()


@pytest.mark.parametrize(
    "make, sizes, expected",
    [
        (causal_llama, {"width": 2, "depth": 2}, {"hidden_size": 64, "num_key_value_heads": 4, "num_hidden_layers": 4}),
        (
            causal_llama,
            {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3, "num_hidden_layers": 3},
            {"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 6, "num_hidden_layers": 3},
        ),
        (causal_gpt2, {"width": 2, "num_hidden_layers": 3}, {"n_embd": 64, "n_head": 8, "n_layer": 3}),
        (bert, {"width": 2}, {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8}),
        (bert_mlm, {"width": 2}, {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8}),
    ],
    ids=["llama-x2", "llama-48", "gpt2", "bert", "bert-mlm"],
)
def test_a_grown_model_saves_loads_and_generates_as_its_own_class(
    make: Any, sizes: dict[str, Any], expected: dict[str, int], tmp_path: Path
) -> None:
    model = make()
    grown = growth.grow_transformer(model, **sizes).eval()
    assert type(grown) is type(model)
    assert {key: getattr(grown.config, key) for key in expected} == expected
    again = reloaded(grown, tmp_path / "grown")
    assert type(again) is type(model)
    if model.get_output_embeddings() is not None:
        assert tied(grown) == tied(again) == tied(model)
    for x in ({"input_ids": ids(3, 11)}, padded(2, 9)):
        assert torch.equal(output(again, x), output(grown, x))
        y = output(model, x)
        assert float((output(again, x) - y).abs().max()) <= 1e-5 * float(y.abs().max())
    if hasattr(grown, "generate") and grown.can_generate():
        prompt = ids(2, 5, seed=7)
        made = again.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        assert made.shape == (2, 13)
        assert torch.equal(made, continuation(grown, prompt, 8))


@pytest.mark.parametrize(
    "make, sizes",
    [
        (lambda: noisy(transformers.BertModel(transformers.BertConfig(**BERT))), {}),
        (lambda: noisy(transformers.LlamaModel(transformers.LlamaConfig(**LLAMA))), {"hidden_size": 40}),
        (
            lambda: noisy(transformers.GPT2Model(transformers.GPT2Config(**GPT2))),
            {"hidden_size": 48, "num_attention_heads": 6},
        ),
    ],
    ids=["bert", "llama-40", "gpt2"],
)
def test_a_model_without_a_head_keeps_its_old_channels_first(make: Callable[[], nn.Module], sizes: dict) -> None:
    """Its output is the stream, which widens: the old channels come first and are unchanged (the check says so)."""
    model = make()
    grown = growth.grow_transformer(model, **(sizes or {"width": 2}))
    x = padded(3, 10)
    with torch.no_grad():
        y, z = model(**x).last_hidden_state, grown(**x).last_hidden_state
    assert z.shape == (*y.shape[:-1], grown.config.hidden_size) and z.shape[-1] > y.shape[-1]
    assert float((z[..., : y.shape[-1]] - y).abs().max()) <= RELATIVE * float(y.abs().max())


def test_a_per_layer_heads_graph_saves_and_loads_as_the_same_function(tmp_path: Any) -> None:
    wide, _ = widened("gpt2")
    surgery.save(wide, tmp_path / "wide")
    again = surgery.load(tmp_path / "wide")
    for length in (7, 12):
        x = {"input_ids": ids(2, length)}
        assert torch.equal(output(again, x), output(wide, x))


# --- the command line ----------------------------------------------------------------------------------------


@pytest.fixture
def saved_llama(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = causal_llama()
    model.save_pretrained(tmp_path / "small")
    return model, tmp_path / "small"


@pytest.mark.parametrize(
    "settings, layers",
    [(["hidden_size=64", "num_attention_heads=8", "num_hidden_layers=4"], 4), (["width=2", "depth=1.5"], 3)],
)
def test_growth_mutate_set_writes_what_grow_transformer_returns(
    cli: Any, saved_llama: tuple[nn.Module, Path], settings: list[str], layers: int
) -> None:
    model, small = saved_llama
    out = small.parent / "big"
    r = cli("growth", "mutate", f"hf:{small}", *[a for s in settings for a in ("--set", s)], "--out", out)
    assert r.code == 0, r
    assert "a LlamaForCausalLM again" in r.out
    big = type(model).from_pretrained(out, use_safetensors=True).eval()
    kwargs = dict(item.split("=") for item in settings)
    python = growth.grow_transformer(
        model, **{k: float(v) if k in ("width", "depth") else int(v) for k, v in kwargs.items()}, seed=0
    ).eval()
    assert _config(big) == _config(python) and big.config.hidden_size == 64
    assert big.config.num_hidden_layers == layers and big.config.num_attention_heads == 8
    for x in ({"input_ids": ids(2, 10)}, padded(3, 8)):
        assert torch.equal(output(big, x), output(python, x))


def _config(model: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}


@pytest.mark.parametrize(
    "settings, message",
    [
        (["hiden_size=64"], "did you mean hidden_size"),
        (["hidden_size=big"], "hidden_size takes a whole number"),
        (["hidden_size"], "expected KEY=VALUE"),
        (["hidden_size=16"], "smaller than the model's 32"),
        (["width=2", "hidden_size=64"], "not both"),
    ],
)
def test_growth_mutate_set_refuses_bad_settings_in_one_line(
    cli: Any, saved_llama: tuple[nn.Module, Path], settings: list[str], message: str
) -> None:
    _, small = saved_llama
    out = small.parent / "big"
    r = cli("growth", "mutate", f"hf:{small}", *[a for s in settings for a in ("--set", s)], "--out", out)
    assert r.code == 2, r
    assert message in r.err and r.err.strip().count("\n") == 0, r.err
    assert not out.exists()


def test_set_and_an_op_option_together_are_refused(cli: Any, saved_llama: tuple[nn.Module, Path]) -> None:
    _, small = saved_llama
    r = cli("growth", "mutate", f"hf:{small}", "--set", "width=2", "--factor", "2")
    assert r.code == 2 and "--factor does not apply to --set" in r.err, r


# --- slimming: the extracted half-width transformer is its own class too -------------------------------------


def test_a_uniform_slim_extract_is_a_llama_that_round_trips(tmp_path: Path) -> None:
    model = causal_llama()
    half = surgery.slim(model, 0.5)
    small = half.extract().eval()
    assert type(small) is type(model)
    assert (small.config.hidden_size, small.config.intermediate_size) == (16, 32)
    again = reloaded(small, tmp_path / "small")
    for x in ({"input_ids": ids(3, 11)}, padded(2, 9)):
        assert torch.equal(output(again, x), output(small, x))
    x = {"input_ids": ids(3, 11)}  # the view is a graph traced on input_ids alone
    view = output(half.eval(), x)
    assert float((output(small, x) - view).abs().max()) <= 1e-5 * float(view.abs().max())
