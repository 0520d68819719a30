"""surgery.graph.capture: every family captures and cuts exactly (fx, fx with automatic leaves, torch.export).

Transformers and timm models are built from small configs with random weights (no downloads).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers

import surgery
from surgery.graph.capture import capture
from surgery.graph.inputs import Example

transformers.logging.set_verbosity_error()

SMALL = {
    "num_hidden_layers": 3,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 120,
}
CONFIGS = {
    "gpt2": ("GPT2LMHeadModel", {"n_layer": 3, "n_embd": 32, "n_head": 4, "vocab_size": 120, "n_positions": 64}),
    "bert": ("BertForSequenceClassification", {**SMALL, "num_labels": 3}),
    "llama": ("LlamaForCausalLM", {**SMALL, "num_key_value_heads": 2}),
}
FAMILIES = {
    name: (lambda cls=cls, cfg=cfg: surgery.build_model(f"hf:{cls}", config=cfg))
    for name, (cls, cfg) in CONFIGS.items()
}
LAYERS = {"gpt2": "transformer.h", "bert": "bert.encoder.layer", "llama": "model.layers"}


def _text(batch: int, length: int, pad: int = 0) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[0, -pad:] = 0  # a padded sequence: the mask matters
    return {"input_ids": torch.randint(1, 120, (batch, length)), "attention_mask": mask}


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[attr-defined]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    return request.param, FAMILIES[request.param]().eval()


def test_hugging_face_models_cut_exactly_at_a_layer_and_at_the_stack(family, tmp_path: Path) -> None:
    name, model = family
    stack = LAYERS[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pieces = surgery.cut(model, [f"{stack}.1", stack], _text(2, 12))
    assert len(pieces) == 3 and pieces.infos()[0].origin.tracer == "export"
    noted = any("use_cache=False" in str(w.message) for w in caught)
    assert noted == model.can_generate()  # only text generators keep a cache; bert's use_cache means nothing
    assert pieces.infos()[0].in_names == ("input_ids", "attention_mask")
    for batch, length, pad in ((2, 12, 3), (3, 7, 2), (1, 20, 0)):  # other batch sizes and lengths than captured
        inputs = _text(batch, length, pad)
        out, ref = pieces(**inputs), model(**inputs, use_cache=False) if name != "bert" else model(**inputs)
        assert type(out) is type(ref) and torch.equal(_logits(out), _logits(ref))
    surgery.save(pieces, tmp_path / "p")
    again = surgery.load(tmp_path / "p").eval()
    inputs = _text(2, 9, 4)
    assert torch.equal(_logits(again(**inputs)), _logits(pieces(**inputs)))
    surgery.save(model, tmp_path / "m")  # the whole model, then cut again after loading
    reloaded = surgery.load(tmp_path / "m").eval()
    twice = surgery.cut(reloaded, [f"{stack}.0"], _text(2, 8))
    assert torch.equal(_logits(twice(**inputs)), _logits(pieces(**inputs)))


def test_pieces_follow_train_and_eval_like_the_model() -> None:
    torch.manual_seed(0)
    model = FAMILIES["bert"]().eval()
    pieces = surgery.cut(model, "bert.encoder.layer.0", _text(2, 8))
    inputs = _text(2, 8)
    pieces.train()
    a, b = pieces(**inputs).logits, pieces(**inputs).logits
    assert not torch.equal(a, b)  # dropout is on
    pieces.eval()
    assert torch.equal(pieces(**inputs).logits, model(**inputs).logits)


def test_timm_vit_cuts_at_blocks_and_inside_them() -> None:
    torch.manual_seed(0)
    vit = surgery.build_model("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    for at in (["blocks.1"], ["blocks"], ["blocks.0.attn", "blocks.2.mlp.fc1"]):
        pieces = surgery.cut(vit, at, x)
        assert pieces.infos()[0].origin.tracer == "fx"
        assert torch.equal(pieces(torch.ones(5, 3, 32, 32)), vit(torch.ones(5, 3, 32, 32)))


def test_container_paths_are_cut_points_and_unknown_names_say_what_is_close() -> None:
    vit = surgery.build_model(
        "torchvision.models:VisionTransformer",
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
    )
    names = {p.name for p in surgery.cut_points(vit, torch.randn(1, 3, 32, 32))}
    assert {"encoder.layers", "encoder.layers.encoder_layer_0"} <= names
    with pytest.raises(
        surgery.SurgeryError, match=r"'encoder.layer' is not a module path or node name.*closest: encoder.layers"
    ):
        surgery.cut(vit, "encoder.layer")


def test_tracer_can_be_forced_and_names_mean_the_same_under_both() -> None:
    torch.manual_seed(0)
    net = surgery.build_model("resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    by_fx, by_export = surgery.cut(net, "layer2", x, tracer="fx"), surgery.cut(net, "layer2", x, tracer="export")
    assert by_export.infos()[0].origin.tracer == "export"
    assert by_fx.infos()[0].out_specs == by_export.infos()[0].out_specs  # the same point of the network
    assert torch.allclose(by_export(x), net(x), atol=1e-5) and torch.equal(by_fx(x), net(x))
    with pytest.raises(surgery.SurgeryError, match="unknown tracer 'jit'"):
        capture(net, tracer="jit")


def test_example_inputs_from_the_cli_grammar() -> None:
    ex = Example.parse(["input_ids=int64:2,16 attention_mask=int64:2,16"], vocab=50)
    assert set(ex.kwargs) == {"input_ids", "attention_mask"} and int(ex.kwargs["input_ids"].max()) < 50
    assert bool((ex.kwargs["attention_mask"] == 1).all())
    with pytest.raises(surgery.SurgeryError, match="is not \\[name=\\]\\[dtype:\\]shape"):
        Example.parse(["input_ids=int64:2x16"])
    with pytest.raises(surgery.SurgeryError, match="unknown dtype 'int8'"):
        Example.parse(["x=int8:1,2"])


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), Gate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Gate(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_block_becomes_a_leaf_or_names_the_op_and_the_fix() -> None:
    with pytest.raises(surgery.SurgeryError) as err:
        surgery.cut(DataDependent(), "inner.0", tracer="fx")
    msg = str(err.value)
    assert "\n" not in msg and "inner.1" in msg and "leaf_modules" in msg and "x.sum() > 0" in msg
    model = DataDependent()
    x = torch.randn(2, 3, 4, 4)
    pieces = surgery.cut(model, "inner.0", leaf_modules=["inner.1"], tracer="fx")  # the suggested fix works
    assert torch.equal(pieces(x), model(x))
    with pytest.warns(UserWarning, match="fx could not trace inside inner.1; kept as leaves"):
        auto = surgery.cut(model, "inner.0")  # the default finds the fix itself
    assert torch.equal(auto(x), model(x)) and auto.infos()[0].origin.leaf_modules == ("inner.1",)
