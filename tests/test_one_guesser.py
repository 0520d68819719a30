"""One input guesser (surgery.inputs) for every entry point: growth of text models needs no example either.

Models are built from small configs with random weights (tests/test_optional_inputs.py's).
Without ``example_input``, ``growth.sites``, ``net2wider`` and ``net2deeper`` run the model
on the input it declares (token ids), as ``surgery.cut`` does, not on guessed images.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_optional_inputs import TEXT, VOCAB, _value, text_model

import growth
import surgery
from growth.errors import GrowthError
from surgery.graph.inputs import CANDIDATE_SIZES, candidate_examples, declared_example, default_example

POST_NORM = {"bert", "distilbert"}  # a zero-branch block copy would normalise twice: no block site


def _preserved(model: torch.nn.Module, grown: torch.nn.Module, ids: torch.Tensor) -> bool:
    with torch.no_grad():
        ref = _value(model(ids))
        return bool((_value(grown.eval()(ids)) - ref).abs().max() <= 1e-5 * ref.abs().max())


@pytest.mark.parametrize("name", sorted(TEXT))
def test_growth_of_a_text_model_without_an_example_preserves_its_call(name: str) -> None:
    model = text_model(name)
    ids = torch.randint(1, VOCAB, (3, 9))
    wide = growth.sites(model, "net2wider")
    assert wide, "no net2wider site"
    assert _preserved(model, growth.net2wider(model, wide[0], factor=2), ids)
    deep = growth.sites(model, "net2deeper")
    if name in POST_NORM:
        assert deep == []
        with pytest.raises(GrowthError, match="post-norm"):
            growth.net2deeper(model, TEXT[name][2], kind="block")
    else:
        assert deep and deep[0].args == {"kind": "block"}
        assert _preserved(model, growth.net2deeper(model, deep[0], **deep[0].args), ids)


def test_the_guesses_come_from_one_place() -> None:
    gpt2, net = text_model("gpt2"), torchvision.models.resnet18()
    assert declared_example(net) is None and candidate_examples(net)[0].describe() == "float32:2x3x64x64"
    assert len(candidate_examples(net)) == len(CANDIDATE_SIZES)
    assert [e.describe() for e in candidate_examples(gpt2)] == [declared_example(gpt2, batch=2).describe()]
    assert default_example(gpt2).describe() == "input_ids=int64:1x16"  # the model's minimal call
    assert default_example(net).describe() == "float32:1x3x224x224"
    first = torch.nn.Linear(7, 3)
    assert candidate_examples(torch.nn.Sequential(first), first)[0].describe() == "float32:2x7"


def test_a_timm_vit_built_for_small_images_is_guessed_at_its_own_size() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    assert vit.pretrained_cfg["input_size"][-1] == 224  # what timm's config still says
    assert default_example(vit).describe() == "float32:1x3x32x32"
    pieces = surgery.cut(vit, "blocks.0")  # no example: the guess must run
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(pieces(x), vit(x))


def test_a_grown_text_model_is_guessed_from_the_inputs_its_graph_records() -> None:
    from surgery.graph.inputs import recorded_example

    gpt2 = text_model("gpt2")
    deeper = growth.net2deeper(gpt2, "transformer.h.0", kind="block")  # a GraphModule: no config, no main input
    assert recorded_example(deeper).describe() == "input_ids=int64:1x16"
    wider = growth.net2wider(deeper, "transformer.h.1.mlp.c_fc", factor=2, seed=0)  # no example: tokens guessed
    ids = torch.randint(1, VOCAB, (3, 7))
    assert (wider(ids).logits - gpt2(ids).logits).abs().max() <= 1e-5 * gpt2(ids).logits.abs().max()
