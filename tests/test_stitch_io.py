"""Saving/loading, stitching with adapters, channel matching and drawing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import surgery
from surgery.cut import piece_info


@pytest.fixture(scope="module")
def r18() -> torch.nn.Module:
    return surgery.build_model("resnet18", num_classes=10).eval()


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


def test_stitch_resnet18_up_with_resnet50_down() -> None:
    x = torch.randn(2, 3, 64, 64)
    a = surgery.cut(surgery.build_model("resnet18").eval(), "layer2", x)
    b = surgery.cut(surgery.build_model("resnet50").eval(), "layer2", x)
    hybrid = surgery.stitch(a[0], b[1], x).eval()
    assert len(hybrid) == 3
    ad = hybrid[1]
    assert isinstance(ad, surgery.Adapter)
    assert (ad.map.in_channels, ad.map.out_channels) == (128, 512)
    assert ad.in_shape == (128, 8, 8) and ad.out_shape == (512, 8, 8)
    with torch.no_grad():
        assert hybrid[0](x).shape == (2, 128, 8, 8)
        assert hybrid(x).shape == (2, 1000)
    # and the other way round, with batchnorm in the adapter
    back = surgery.stitch(b[0], a[1], x, batchnorm=True).eval()
    assert back[1].map.out_channels == 128 and isinstance(back[1].norm, torch.nn.BatchNorm2d)
    assert back(x).shape == (2, 1000)


def test_stitch_same_shapes_needs_no_adapter_and_saves(tmp_path: Path) -> None:
    x = torch.randn(1, 3, 32, 32)
    a = surgery.cut(surgery.build_model("resnet18", num_classes=10).eval(), "layer2", x)
    b = surgery.cut(surgery.build_model("resnet34", num_classes=10).eval(), "layer2", x)
    hybrid = surgery.stitch(a[0], b[1], x).eval()
    assert len(hybrid) == 2
    with torch.no_grad():
        assert torch.equal(hybrid(x), b[1](a[0](x)))
    with_adapter = surgery.stitch(b[0], surgery.stitch(a[0], a[1], x)[1:], x)
    assert len(with_adapter) == 2
    surgery.save(hybrid, tmp_path / "h")
    assert torch.equal(surgery.load(tmp_path / "h").eval()(x), hybrid(x))


def test_adapter_inits_and_resizing() -> None:
    ident = surgery.adapter((16, 8, 8), (16, 8, 8))
    x = torch.rand(2, 16, 8, 8)  # non-negative, as after a ReLU
    assert torch.equal(ident(x), x)
    down = surgery.adapter((16, 8, 8), (32, 4, 4))
    assert down(x).shape == (2, 32, 4, 4) and isinstance(down.pre, torch.nn.AdaptiveAvgPool2d)
    up = surgery.adapter((16, 4, 4), (8, 8, 8))
    assert up(torch.rand(2, 16, 4, 4)).shape == (2, 8, 8, 8) and isinstance(up.post, torch.nn.Upsample)
    perm = torch.randperm(16)
    matched = surgery.adapter((16, 8, 8), (16, 8, 8), init="matching", assignment=perm)
    assert torch.equal(matched(x), x[:, perm])
    tokens = surgery.adapter((197, 768), (197, 384))
    assert isinstance(tokens.map, torch.nn.Linear) and tokens(torch.randn(2, 197, 768)).shape == (2, 197, 384)
    with pytest.raises(surgery.SurgeryError, match="no adapter maps"):
        surgery.adapter((197, 768), (50, 768))
    assert isinstance(surgery.adapter((8, 4, 4), (16, 4, 4)).map, torch.nn.Conv2d)
    assert isinstance(surgery.adapter((8,), (16,)).map, torch.nn.Linear)


@pytest.mark.parametrize("method", ["hungarian", "gale-shapley"])
@pytest.mark.parametrize("metric", ["corr", "cos", "l2"])
def test_match_channels_recovers_a_shuffle(method: str, metric: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 24, 4, 4, generator=g) * torch.rand(24, generator=g).view(1, -1, 1, 1)
    perm = torch.randperm(24, generator=g)
    b = a[:, perm] + 0.01 * torch.randn(a[:, perm].shape, generator=g)
    m = surgery.match_channels(a, b, method=method, metric=metric)
    assert torch.equal(perm[m], torch.arange(24))


def test_match_channels_unequal_counts() -> None:
    a = torch.randn(128, 6, 2, 2)
    b = torch.cat([a[:, [2, 0]], torch.randn(128, 1, 2, 2)], dim=1)  # B has 3 channels
    m = surgery.match_channels(a, b)
    assert m[2] == 0 and m[0] == 1 and (m == -1).sum() == 3


def test_render_dot_and_svg(tmp_path: Path, r18: torch.nn.Module) -> None:
    pieces = surgery.cut(r18, "layer2", torch.randn(1, 3, 32, 32))
    dot = surgery.render(pieces, tmp_path / "g.dot").read_text()
    assert "cluster_0" in dot and "cluster_1" in dot and "128x4x4" in dot
    if shutil.which("dot"):
        assert surgery.render(pieces, tmp_path / "g.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    else:
        with pytest.raises(surgery.SurgeryError, match="graphviz 'dot' binary"):
            surgery.render(pieces, tmp_path / "g.svg")


# --- bad input: one clear line each, nothing overwritten -------------------------------------------


def test_unknown_model_lists_closest() -> None:
    with pytest.raises(surgery.SurgeryError, match="closest: resnet18"):
        surgery.build_model("resnet81")


def test_unknown_cut_name_lists_closest(r18: torch.nn.Module) -> None:
    with pytest.raises(surgery.SurgeryError, match=r"'layer5'.*closest: layer\d"):
        surgery.cut(r18, "layer5")


def test_cut_order_and_repeats(r18: torch.nn.Module) -> None:
    with pytest.raises(surgery.SurgeryError, match="graph order"):
        surgery.cut(r18, ["layer3", "layer2"])
    with pytest.raises(surgery.SurgeryError, match="given twice"):
        surgery.cut(r18, ["layer2", "layer2"])
    with pytest.raises(surgery.SurgeryError, match="last piece empty"):
        surgery.cut(r18, ["fc"])


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


def test_stitch_mismatch_without_adapters() -> None:
    x = torch.randn(1, 3, 32, 32)
    a = surgery.cut(surgery.build_model("resnet18").eval(), "layer2", x)
    b = surgery.cut(surgery.build_model("resnet50").eval(), "layer2", x)
    with pytest.raises(surgery.SurgeryError, match="128x4x4.*512x4x4.*allow an adapter"):
        surgery.stitch(a[0], b[1], x, allow_adapter=False)


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


# --- the CLI ---------------------------------------------------------------------------------------


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
