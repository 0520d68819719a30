"""Pieces are called the way their model is: optional inputs stay optional (surgery.recut, surgery.tracing).

Each model is built from a small config with random weights (no downloads). A cut with no
example captures the model's minimal call (the guessed main input alone); called with
more inputs (a padded ``attention_mask``), the pieces cut again for that call. fx fixes
a model's optional arguments at their defaults (timm's Hiera takes ``mask=None``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import transformers

import surgery

transformers.logging.set_verbosity_error()

SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
TEXT = {  # class, config, a cut inside the stack
    "gpt2": ("GPT2LMHeadModel", {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64}, "transformer.h.0"),
    "bert": ("BertForSequenceClassification", {**SMALL, "num_labels": 3}, "bert.encoder.layer.0"),
    "llama": ("LlamaForCausalLM", {**SMALL, "num_key_value_heads": 2}, "model.layers.0"),
    "t5-encoder": (
        "T5EncoderModel",
        {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 4, "d_kv": 8},
        "encoder.block.0",
    ),
    "distilbert": (
        "DistilBertModel",
        {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4},
        "transformer.layer.0",
    ),
}
VOCAB = 120


def text_model(name: str) -> torch.nn.Module:
    cls, config, _ = TEXT[name]
    return surgery.build_model(f"hf:{cls}", config={**config, "vocab_size": VOCAB}).eval()


def _value(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state  # type: ignore[attr-defined]


def _padded(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -3:] = 0
    return torch.randint(1, VOCAB, (batch, length)), mask


@pytest.mark.parametrize("name", sorted(TEXT))
def test_text_pieces_cut_without_an_example_take_the_models_own_calls(name: str) -> None:
    model = text_model(name)
    pieces = surgery.cut(model, TEXT[name][2])  # no example: the guessed input_ids alone
    assert pieces.infos()[0].in_names == ("input_ids",)
    ids, mask = _padded(3, 7)
    assert torch.equal(_value(pieces(ids)), _value(model(ids)))
    both = _value(pieces(input_ids=ids, attention_mask=mask))  # not the captured call: cut again for it
    assert torch.equal(both, _value(model(input_ids=ids, attention_mask=mask)))
    ids, mask = _padded(2, 11)  # the second cut is kept and is as dynamic as the first
    assert torch.equal(_value(pieces(ids, attention_mask=mask)), _value(model(ids, attention_mask=mask)))
    assert torch.equal(_value(pieces[:2](ids)), _value(model(ids)))
    assert torch.equal(pieces[0](ids)[0], pieces[0](input_ids=ids)[0])  # a piece alone keeps its graph


def test_pieces_cut_on_a_mask_take_the_call_without_it_before_and_after_saving(tmp_path: Path) -> None:
    model = text_model("bert")
    ids, mask = _padded(2, 9)
    pieces = surgery.cut(model, "bert.encoder.layer.1", {"input_ids": ids, "attention_mask": mask})
    assert pieces.infos()[0].in_names == ("input_ids", "attention_mask")
    assert torch.equal(pieces(ids).logits, model(ids).logits)
    assert torch.equal(pieces(ids, mask).logits, model(ids, mask).logits)  # positional, as the model binds it
    surgery.save(pieces, tmp_path / "p")
    again, saved = surgery.load(tmp_path / "p").eval(), model(ids).logits
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # the loaded pieces cut their model again and compute with the saved weights
    assert torch.equal(again(ids).logits, saved) and not torch.equal(pieces(ids).logits, saved)


def hiera() -> torch.nn.Module:
    return timm.create_model(
        "hiera_tiny_224", embed_dim=16, num_heads=1, stages=(1, 1, 2, 1), img_size=64, num_classes=10
    ).eval()


def test_a_hierarchical_vit_cuts_exactly_at_each_stage_end() -> None:
    net = hiera()
    x = torch.randn(3, 3, 64, 64)
    expected = net(x)
    pieces = surgery.cut(net, [f"blocks.{end}" for end in net.stage_ends])  # the last: the head follows it
    assert len(pieces) == len(net.stage_ends) + 1 and pieces.infos()[0].origin.tracer == "fx"
    assert torch.equal(pieces(x), expected) and torch.equal(pieces(x[:1]), net(x[:1]))


def test_an_optional_argument_is_traced_at_its_default_and_cut_again_when_given() -> None:
    net = hiera()
    assert surgery.graph.fx.optional_defaults(net) == {"mask": None}
    x = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)  # 2x2 mask units, 3 kept in each
    pieces = surgery.cut(net, "blocks.1")
    assert torch.equal(pieces(x), net(x))
    assert torch.equal(pieces(x, mask=keep), net(x, mask=keep))  # the masked call: features, no head
    with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
        pieces[0](x, keep)  # the piece alone says which value its graph fixed
    with pytest.raises(surgery.SurgeryError, match=r"^the pieces take \(x\) as the model does: .*'maks'$"):
        pieces(x, maks=keep)  # what the model refuses, in one line
