"""surgery.io: save/load round trips are exact; tampered or truncated files and non-empty directories are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import surgery
from surgery.cut import piece_info


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
