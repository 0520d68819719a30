"""The ``surgery`` command line (surgery.cli): cut, stitch, show, nodes, --weights; bad input is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import surgery
from surgery.graph.flops import human


def _flops_per_sample(out: str, index: int) -> str:
    """The FLOPs per sample cell of piece ``index`` in a printed pieces table."""
    header = next(line for line in out.splitlines() if "FLOPs per" in line and "┃" in line)  # it may wrap
    column = [c.strip().startswith("FLOPs per") for c in header.split("┃")].index(True)
    row = next(line for line in out.splitlines() if line.startswith(f"│ {index} "))
    return [c.strip() for c in row.split("│")][column]


def test_cli_cut_stitch_show(cli, tmp_path: Path) -> None:
    r = cli(
        "surgery",
        "cut",
        "resnet18",
        "--at",
        "layer2",
        "--input",
        "1,3,32,32",
        "--out",
        tmp_path / "a",
        "--num-classes",
        "10",
    )
    assert r.code == 0, r
    assert "max |pieces(x) - model(x)| = 0" in r.out and (tmp_path / "a" / "recipe.json").is_file()
    cut_flops = _flops_per_sample(r.out, 0)
    pieces_a, x = surgery.load(tmp_path / "a"), torch.randn(1, 3, 32, 32)
    assert "FLOPs per sample: forward FLOPs counted on float32:1x3x32x32\n" in r.out
    r = cli(
        "surgery",
        "cut",
        "resnet50",
        "--at",
        "layer2",
        "--input",
        "1,3,32,32",
        "--out",
        tmp_path / "b",
        "--num-classes",
        "10",
    )
    assert r.code == 0, r
    r = cli("surgery", "stitch", f"{tmp_path / 'a'}:0", f"{tmp_path / 'b'}:1", "--out", tmp_path / "h")
    assert r.code == 0, r
    # the same piece, counted on a batch of 2 here: the same FLOPs per sample, and the input named
    assert _flops_per_sample(r.out, 0) == cut_flops == human(surgery.count_flops(pieces_a[0], x))
    assert "counted on float32:2x3x32x32, divided by its batch of 2" in r.out
    hybrid = surgery.load(tmp_path / "h").eval()
    assert isinstance(hybrid[1], surgery.Adapter) and hybrid(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    r = cli("surgery", "show", tmp_path / "h", "--out", tmp_path / "h.dot")
    assert r.code == 0 and "cluster_2" in (tmp_path / "h.dot").read_text()
    r = cli("surgery", "nodes", "resnet18", "--input", "1,3,32,32", "--depth", "1")
    assert r.code == 0 and "layer2" in r.out and "128x4x4" in r.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["cut", "resnet81", "--at", "layer2"], "closest: resnet18"),
        (["cut", "resnet18", "--at", "layer22"], "closest: layer2"),
        (["cut", "resnet18", "--at", "layer3", "--at", "layer2"], "graph order"),
        (["cut", "resnet18", "--at", "layer2", "--input", "1,3,x"], "is not [name=][dtype:]shape"),
        (
            ["cut", "resnet18", "--at", "layer2", "--input", "1,3", "--out", "{tmp}/c"],
            "failed on an input of shape (1, 3)",
        ),
        (["stitch", "nowhere:0", "nowhere:1", "--out", "{tmp}/s"], "no recipe.json"),
    ],
)
def test_cli_errors_are_one_line_exit_2(cli, tmp_path: Path, args: list[str], message: str) -> None:
    r = cli("surgery", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.code == 2, r
    assert message in r.err and "Traceback" not in r.err + r.out
    assert len(r.err.strip().splitlines()) == 1 or len(" ".join(r.err.split())) < 400


def test_cli_refuses_non_empty_output_and_keeps_it(cli, tmp_path: Path) -> None:
    out = tmp_path / "resnet18-cut"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli("surgery", "cut", "resnet18", "--at", "layer2", "--out", out)
    assert r.code == 2 and "not empty" in r.err
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_weights_files_load_without_pickles(cli, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = surgery.build_model("resnet18", num_classes=10)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        out = tmp_path / f"cut-{weights}"
        r = cli(
            "surgery",
            "cut",
            "resnet18",
            "--num-classes",
            "10",
            "--at",
            "layer2",
            "--input",
            "1,3,32,32",
            "--weights",
            tmp_path / weights,
            "--out",
            out,
        )
        assert r.code == 0 and "= 0 on" in r.out, r
        loaded = surgery.load(out)
        assert torch.equal(loaded[0].get_submodule("conv1").weight, model.conv1.weight)
    torch.save({"model": model}, tmp_path / "pickled.pt")  # a whole pickled module, not a state_dict
    r = cli(
        "surgery",
        "cut",
        "resnet18",
        "--num-classes",
        "10",
        "--at",
        "layer2",
        "--weights",
        tmp_path / "pickled.pt",
        "--out",
        tmp_path / "p",
    )
    assert r.code == 2 and "cannot be read as weights" in r.err and not (tmp_path / "p").exists()
    r = cli(
        "surgery", "cut", "resnet18", "--at", "layer2", "--weights", tmp_path / "w.pt", "--out", tmp_path / "q"
    )  # 1000 vs 10 classes
    assert r.code == 2 and "do not fit the model" in r.err and "fc.weight" in r.err


def test_cli_cuts_a_saved_hugging_face_model_exactly(cli, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "bert")
    inputs = "input_ids=int64:1,16 attention_mask=int64:1,16"
    r = cli("surgery", "cut", f"hf:{tmp_path / 'bert'}", "--at", "bert.encoder.layer.1", "--input", inputs,
            "--out", tmp_path / "cut")  # fmt: skip
    assert r.code == 0, r
    assert "max |pieces(x) - model(x)| = 0" in r.out
    pieces = surgery.load(tmp_path / "cut").eval()
    ids = torch.randint(1, 120, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            pieces(input_ids=ids, attention_mask=mask).logits, model(ids, mask).logits, atol=1e-5, rtol=0
        )
    assert not list(tmp_path.glob("**/*.bin")) and not list(tmp_path.glob("**/*.pkl"))
