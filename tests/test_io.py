"""surgery.files.io: save/load round trips are exact; tampered or truncated files, non-empty directories refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import surgery
from surgery.pieces.cut import piece_info


def test_save_load_round_trip_is_exact(tmp_path: Path, r18: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    pieces = surgery.cut(r18, ["layer2", "layer3.0.conv1"], x)
    surgery.save(pieces, tmp_path / "p")
    again = surgery.load(tmp_path / "p").eval()
    assert isinstance(again, surgery.Pieces) and again.cuts == ["layer2", "layer3.0.conv1"]
    assert torch.equal(again(x), pieces(x))
    assert [piece_info(p).out_specs for p in again] == [piece_info(p).out_specs for p in pieces]
    for (ka, a), (kb, b) in zip(pieces.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(a, b)


def test_save_load_whole_model_with_replaced_stem(tmp_path: Path) -> None:
    model = surgery.build_model("resnet18", num_classes=10)
    model = surgery.replace(model, "conv1", torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False))
    model = surgery.replace(model, "maxpool", torch.nn.Identity()).eval()
    surgery.save(model, tmp_path / "m")
    again = surgery.load(tmp_path / "m").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))


def test_tampered_and_truncated_files(tmp_path: Path, r18: torch.nn.Module) -> None:
    pieces = surgery.cut(r18, "layer2", torch.randn(1, 3, 32, 32))
    d = surgery.save(pieces, tmp_path / "p")
    weights = d / "weights.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(surgery.SurgeryError, match="modified or truncated"):
        surgery.load(d)
    weights.write_bytes(blob)
    recipe = json.loads((d / "recipe.json").read_text())
    recipe["pieces"][0]["origin"]["model"]["source"] = "os:system"
    (d / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(surgery.SurgeryError, match="trust_code"):
        surgery.load(d)
    (d / "recipe.json").write_text('{"format": "surgery/1", "kind": ')
    with pytest.raises(surgery.SurgeryError, match="not valid JSON"):
        surgery.load(d)


def test_existing_output_directory_is_refused_and_kept(tmp_path: Path, r18: torch.nn.Module) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(surgery.SurgeryError, match="not empty"):
        surgery.save(surgery.cut(r18, "layer2"), out)
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


# --- the mode a model is loaded in ------------------------------------------------------------------


def _outputs_equal(a: torch.nn.Module, b: torch.nn.Module, *args: object, **kwargs: object) -> bool:
    """``a`` and ``b`` called the same way give bit-identical outputs (``.logits`` of a ModelOutput)."""
    out_a, out_b = a(*args, **kwargs), b(*args, **kwargs)
    out_a, out_b = (getattr(o, "logits", o) for o in (out_a, out_b))
    return torch.equal(out_a, out_b)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _modes(model: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.fixture
def trained_bn_resnet() -> torch.nn.Module:
    """A ResNet-18 whose BatchNorm running statistics are not the defaults (train-mode passes), then eval."""
    torch.manual_seed(0)
    net = surgery.build_model("resnet18", num_classes=10)
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    return net.eval()


def test_gpt2_with_dropout_loads_in_eval_mode_exactly(tmp_path: Path) -> None:
    config = {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 120, "n_positions": 32}
    config |= {"resid_pdrop": 0.3, "embd_pdrop": 0.3, "attn_pdrop": 0.3}
    gpt2 = surgery.build_model("hf:GPT2LMHeadModel", config=config).eval()
    surgery.save(gpt2, tmp_path / "gpt2")
    again = surgery.load(tmp_path / "gpt2")
    assert not any(m.training for m in again.modules())
    ids = torch.randint(0, 120, (2, 9))
    with torch.no_grad():
        assert _outputs_equal(again, gpt2, ids) and _outputs_equal(again, gpt2, ids)  # first call and after it


def test_resnet_pieces_load_in_eval_mode_and_keep_their_statistics(
    tmp_path: Path, trained_bn_resnet: torch.nn.Module
) -> None:
    pieces = surgery.cut(trained_bn_resnet, "layer2")
    surgery.save(pieces, tmp_path / "p")
    again = surgery.load(tmp_path / "p")
    assert not again.training and _modes(again) == _modes(pieces)
    assert not any(m.training for m in again.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _outputs_equal(again, pieces, x) and _outputs_equal(again, pieces, x)
    assert _states_equal(again, pieces)  # the first call did not update the running statistics


def test_train_mode_and_mixed_modes_are_kept(tmp_path: Path, trained_bn_resnet: torch.nn.Module) -> None:
    net = trained_bn_resnet.train()
    surgery.save(net, tmp_path / "train")
    again = surgery.load(tmp_path / "train")
    assert all(m.training for m in again.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert _outputs_equal(again, net, x)  # batch statistics, and the same running-statistics update
    assert _states_equal(again, net)
    net.eval().layer3[0].bn1.train()  # one module in the other mode
    surgery.save(net, tmp_path / "mixed")
    modes = _modes(surgery.load(tmp_path / "mixed"))
    assert modes == _modes(net) and modes["layer3.0.bn1"] and not modes["layer3.0.bn2"]


def test_directory_without_a_recorded_mode_loads_in_eval_mode(
    tmp_path: Path, trained_bn_resnet: torch.nn.Module
) -> None:
    d = surgery.save(trained_bn_resnet.train(), tmp_path / "m")
    recipe = json.loads((d / "recipe.json").read_text())
    assert recipe["format_version"] == 3 and recipe["training"] is True
    del recipe["training"], recipe["mode_exceptions"]
    (d / "recipe.json").write_text(json.dumps({**recipe, "format_version": 2}))
    again = surgery.load(d)
    assert not any(m.training for m in again.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _outputs_equal(again, trained_bn_resnet.eval(), x)
    recipe["mode_exceptions"] = ["no.such.module"]
    (d / "recipe.json").write_text(json.dumps({**recipe, "training": False}))
    with pytest.raises(surgery.SurgeryError, match="module 'no.such.module'"):
        surgery.load(d)
