"""surgery.exporters: pieces as ONNX (chained in onnxruntime) and .pt2 (torch.export) files, and `surgery export`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision

import surgery
from surgery.exporters import io_names, read_manifest, without_fused_attention
from surgery.pieces.cut import piece_info

ort = pytest.importorskip("onnxruntime")

# model -> cuts giving 2 and 3 pieces (a 3-piece cut inside a residual block hands over 2 values)
CUTS = {
    "resnet18": (["layer2"], ["layer1.0.conv2", "layer3"]),
    "mobilenet_v3_small": (["features.4"], ["features.3.block", "features.9"]),
    "vit": (["encoder.layers.encoder_layer_0"], ["encoder.dropout", "encoder.layers.encoder_layer_1.mlp"]),
}
CASES = [(name, n) for name in CUTS for n in (2, 3)]


def _model(name: str) -> torch.nn.Module:
    if name == "vit":
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        ).eval()
    return torchvision.models.get_model(name, weights=None, num_classes=10).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``(name, n, fmt) -> (model, pieces, directory)``, each exported once (example batch size 2)."""
    cache: dict = {}

    def get(name: str, n: int, fmt: str):
        key = (name, n, fmt)
        if key not in cache:
            torch.manual_seed(0)
            model = _model(name)
            x = torch.randn(2, 3, 32, 32)
            pieces = surgery.cut(model, CUTS[name][n - 2], x)
            out = surgery.export(pieces, tmp_path_factory.mktemp("export") / f"{name}-{n}", fmt, example_input=x)
            cache[key] = (model, pieces, out)
        return cache[key]

    return get


def _ort_chain(directory: Path, x: torch.Tensor) -> list[torch.Tensor]:
    """Run the ONNX pieces one after another as the manifest says: outputs of k, in order, are inputs of k+1."""
    manifest = read_manifest(directory)
    values = [x.numpy()]
    for entry in manifest["pieces"]:
        session = ort.InferenceSession(str(directory / entry["file"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [v["name"] for v in entry["inputs"]]
        names = [v["name"] for v in entry["inputs"]]
        values = session.run([v["name"] for v in entry["outputs"]], dict(zip(names, values)))
    return [torch.from_numpy(v) for v in values]


@pytest.mark.parametrize("name,n", CASES)
def test_onnx_pieces_chained_in_onnxruntime_match_the_model(exported, name: str, n: int) -> None:
    model, pieces, out = exported(name, n, "onnx")
    manifest = read_manifest(out)
    assert manifest["format"] == "onnx" and manifest["format_version"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"piece{k}.onnx" for k in range(n)), "pieces.json"])
    x = torch.randn(5, 3, 32, 32)  # not the example's batch size
    with torch.no_grad():
        want = model(x)
    (got,) = _ort_chain(out, x)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert manifest["check"]["chain_max_abs_diff"] <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("name,n", CASES)
def test_manifest_describes_every_boundary(exported, name: str, n: int) -> None:
    model, pieces, out = exported(name, n, "onnx")
    entries = read_manifest(out)["pieces"]
    assert [e["file"] for e in entries] == [f"piece{k}.onnx" for k in range(n)]
    for k, (entry, piece) in enumerate(zip(entries, pieces)):
        info = piece_info(piece)
        assert [v["value"] for v in entry["inputs"]] == list(info.in_names)
        assert [v["value"] for v in entry["outputs"]] == list(info.out_names)
        assert [tuple(v["shape"]) for v in entry["outputs"]] == [s.shape for s in info.out_specs]
        assert all(v["dtype"] == "float32" for v in entry["inputs"] + entry["outputs"])
        if k + 1 < n:  # what leaves piece k is what enters piece k+1
            nxt = entries[k + 1]["inputs"]
            assert [(v["value"], v["shape"]) for v in entry["outputs"]] == [(v["value"], v["shape"]) for v in nxt]
    assert entries[0]["inputs"][0]["shape"] == [3, 32, 32] and entries[-1]["outputs"][0]["shape"] == [10]
    if name == "resnet18" and n == 3:  # cut inside layer1.0: the branch and the block input cross
        assert [v["name"] for v in entries[0]["outputs"]] == ["layer1_0_conv2", "maxpool"]


@pytest.mark.parametrize("name,n", CASES)
def test_pt2_pieces_reload_and_match_exactly(exported, name: str, n: int) -> None:
    model, pieces, out = exported(name, n, "pt2")
    manifest = read_manifest(out)
    assert manifest["format"] == "pt2"
    assert [e["file"] for e in manifest["pieces"]] == [f"piece{k}.pt2" for k in range(n)]
    x = torch.randn(3, 3, 32, 32)  # not the example's batch size
    args: tuple = (x,)
    with torch.no_grad(), without_fused_attention():  # the ViT's attention as torch.export captures it
        for k, piece in enumerate(pieces):
            want = piece(*args)
            got = torch.export.load(out / f"piece{k}.pt2").module()(*args)
            if isinstance(want, tuple):
                assert isinstance(got, tuple) and all(torch.equal(g, w) for g, w in zip(got, want))
            else:
                assert torch.equal(got, want)
            args = want if isinstance(want, tuple) else (want,)
        assert torch.equal(args[0], model(x))


def test_adapters_export_and_passed_through_values_are_renamed(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    r18 = _model("resnet18")
    a = surgery.cut(r18, "layer2", x)
    hybrid = surgery.Pieces([a[0], surgery.adapter((128, 4, 4), (96, 4, 4)), surgery.adapter((96, 4, 4), (256, 2, 2))])
    out = surgery.export(hybrid, tmp_path / "hybrid", "onnx", example_input=x)
    entries = read_manifest(out)["pieces"]
    assert [e["inputs"][0]["shape"] for e in entries] == [[3, 32, 32], [128, 4, 4], [96, 4, 4]]
    (got,) = _ort_chain(out, x[:1])
    with torch.no_grad():
        assert (got - hybrid(x[:1])).abs().max().item() < 1e-4
    # a piece that hands on one of its inputs untouched: ONNX names each value once (here with the dynamo exporter)
    three = surgery.cut(r18, ["layer1.0.conv1", "layer1.0.conv2"], x)
    assert io_names(three[1]) == (["layer1_0_conv1", "maxpool"], ["layer1_0_conv2", "maxpool.out"])
    out = surgery.export(three[:2], tmp_path / "pass", "onnx", example_input=x, exporter="dynamo")
    entries = read_manifest(out)["pieces"]
    assert [e["exporter"] for e in entries] == ["dynamo", "dynamo"]
    assert [v["name"] for v in entries[1]["outputs"]] == ["layer1_0_conv2", "maxpool.out"]
    got = _ort_chain(out, x)
    with torch.no_grad():
        want = three[:2](x)
    assert all((g - w).abs().max().item() < 1e-4 for g, w in zip(got, want))


def test_refusals_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = surgery.cut(_model("resnet18"), "layer2", torch.randn(1, 3, 32, 32))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases = [
        (dict(directory=tmp_path / "a", format="tflite"), "unknown export format 'tflite'"),
        (dict(directory=full, format="onnx"), "is not empty"),
        (dict(directory=tmp_path / "b", format="onnx", exporter="jit"), "unknown ONNX exporter"),
        (
            dict(directory=tmp_path / "c", format="pt2", example_input=torch.randn(2, 3, 32)),
            "failed on an input of shape",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(surgery.SurgeryError) as e:
            surgery.export(pieces, **kwargs)
        assert message in str(e.value) and "\n" not in str(e.value)
    # a value that is not a tensor crosses the cut (the ViT's batch size, as an int)
    with pytest.raises(surgery.SurgeryError, match=r"not a batched tensor \(int\)") as e:
        surgery.export(surgery.cut(_model("vit"), "conv_proj"), tmp_path / "d", "pt2", torch.randn(2, 3, 32, 32))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "d").exists() and sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the [onnx] extra were not installed
    with pytest.raises(surgery.SurgeryError) as e:
        surgery.export(pieces, tmp_path / "e", "onnx")
    assert str(e.value) == "ONNX export needs onnx and onnxruntime: pip install 'xross-surgery[onnx]'"


def test_exporter_errors_are_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    class Eig(torch.nn.Module):  # complex eigenvalues: neither ONNX exporter handles them
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvals(x).real

    with pytest.raises(surgery.SurgeryError) as e:
        surgery.export(Eig(), tmp_path / "eig", "onnx", example_input=torch.randn(2, 4, 4))
    message = str(e.value)  # both exporters were tried, each says why it failed
    assert message.startswith("piece 0 cannot be exported to ONNX (")
    assert "torchscript: " in message and "dynamo: " in message
    assert "\n" not in message and not (tmp_path / "eig").exists()


def test_cli_export_end_to_end(cli, tmp_path: Path) -> None:
    cut = ["cut", "resnet18", "--num-classes", "10", "--at", "layer1.0.conv2", "--input", "2,3,32,32"]
    r = cli("surgery", *cut, "--out", tmp_path / "cut")
    assert r.code == 0, r
    r = cli("surgery", "export", tmp_path / "cut", "--format", "onnx", "--input", "3,3,32,32", "--out", tmp_path / "e")
    assert r.code == 0, r
    assert "piece0.onnx" in r.out and "piece1.onnx" in r.out and "maxpool" in r.out and "chained" in r.out
    assert read_manifest(tmp_path / "e")["check"]["batch_sizes"] == [3, 1]
    for args, message in [
        (["--format", "tflite", "--out", tmp_path / "x"], "unknown export format 'tflite'"),
        (["--format", "onnx", "--out", tmp_path / "e"], "is not empty"),
        (["--format", "pt2", "--out", tmp_path / "y", "--input", "1,3,x"], "is not [name=][dtype:]shape"),
    ]:
        r = cli("surgery", "export", tmp_path / "cut", *args)
        assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r
    r = cli("surgery", "export", tmp_path / "nowhere", "--out", tmp_path / "z")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r


def _text_model(name: str) -> torch.nn.Module:
    import transformers

    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        return transformers.BertModel(config).eval()
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("name,at,outputs", [("bert", "encoder.layer.0", ["last_hidden_state", "pooler_output"]),
                                             ("gpt2", "transformer.h.0", ["logits"])])  # fmt: skip
def test_keyword_input_pieces_export_to_onnx_named_after_their_inputs(
    tmp_path: Path, name: str, at: str, outputs: list[str]
) -> None:
    model = _text_model(name)
    ids, mask = torch.randint(1, 64, (2, 12)), torch.ones(2, 12, dtype=torch.int64)
    mask[1, 8:] = 0
    pieces = surgery.cut(model, at, {"input_ids": ids, "attention_mask": mask})
    out = pieces.export(tmp_path / name, "onnx", example_input={"input_ids": ids, "attention_mask": mask})  # the method
    entries = read_manifest(out)["pieces"]
    assert [v["name"] for v in entries[0]["inputs"]] == ["input_ids", "attention_mask"]
    assert [v["name"] for v in entries[-1]["outputs"]] == outputs  # the ModelOutput's keys, as tensors
    assert all(e["exporter"] == "dynamo" for e in entries)  # its sizes stay dynamic (TorchScript would fix them)
    ids, mask = torch.randint(1, 64, (3, 12)), torch.ones(3, 12, dtype=torch.int64)  # another batch size
    mask[0, 5:] = 0
    values = [ids.numpy(), mask.numpy()]
    for entry in entries:
        session = ort.InferenceSession(str(out / entry["file"]), providers=["CPUExecutionProvider"])
        values = session.run(None, dict(zip([v["name"] for v in entry["inputs"]], values)))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask)
    for key, got in zip(outputs, values):
        assert (torch.from_numpy(got) - want[key]).abs().max().item() <= 1e-4 * max(1.0, want[key].abs().max().item())


def test_cut_timm_vit_and_bert_export_with_only_tensors_crossing(tmp_path: Path) -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    out = surgery.export(surgery.cut(vit, "blocks.0", x), tmp_path / "vit", "onnx")  # once: (x, None, False) crossed
    assert [v["name"] for v in read_manifest(out)["pieces"][1]["inputs"]] == ["add_2"]
    bert = _text_model("bert")
    ids = torch.randint(1, 64, (2, 16))
    out = surgery.cut(bert, "encoder.layer.0", ids).export(tmp_path / "bert", "pt2")  # the sizes stay inside
    assert [v["shape"] for v in read_manifest(out)["pieces"][1]["inputs"]] == [[16, 32], [1, 16, 16]]
