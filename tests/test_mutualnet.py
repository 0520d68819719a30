"""xross.methods.mutualnet: the sandwich rule, a run that resumes bit for bit, the query table, best and export.

Small runs on the generated CIFAR-10 stand-in (CPU, one thread).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, final_state, finish, interrupt_after_steps, xross

import surgery
from xross.errors import XrossError
from xross.methods.mutualnet import calibrate, calibration_images, resize, sample_settings
from xross.run.config import TrainConfig
from xross.run.directory import load_slim


def mutualnet_args(archive: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--mode", "mutualnet", "--nets", "resnet18", "--cut", "layer3",
        "--widths", "0.25:1.0", "--resolutions", "32,24", "--sandwich", "3", "--eval-widths", "1.0,0.5,0.25",
        "--bn-batches", "2",
        "--data", str(archive), "--subset", "64", "--eval-subset", "32", "--batch-size", "16",
        "--epochs", "2", "--lr", "1e-3", "--cache-dir", str(cache), "--threads", "1", "--log-every", "1",
        "--eval-every", "0", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_sandwich_widest_first_then_narrowest_then_random() -> None:
    cfg = TrainConfig(mode="mutualnet", nets=["resnet18"], widths="0.25:0.9", resolutions=[32, 28, 24], sandwich=5)
    torch.manual_seed(0)
    draws = [sample_settings(cfg) for _ in range(50)]
    for settings in draws:
        assert len(settings) == 5 and settings[0] == (0.9, 32) and settings[1][0] == 0.25
        assert all(0.25 <= w <= 0.9 and r in (32, 28, 24) for w, r in settings)
    assert {r for s in draws for _, r in s[1:]} == {32, 28, 24}
    alone = TrainConfig(mode="mutualnet", nets=["resnet18"], sandwich=1, image_size=32)
    assert sample_settings(alone) == [(1.0, 32)]


def test_resize_keeps_or_interpolates() -> None:
    x = torch.rand(2, 3, 32, 32)
    assert resize(x, 32) is x
    assert resize(x, 20).shape == (2, 3, 20, 20)
    torch.testing.assert_close(resize(torch.ones(1, 3, 32, 32), 24), torch.ones(1, 3, 24, 24))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nets": ["resnet18", "resnet34"]}, "mutualnet trains one net"),
        ({"widths": "0.5:1.5"}, "0 < LOW <= HIGH <= 1"),
        ({"widths": "half"}, "LOW:HIGH"),
        ({"mode": "xml", "nets": ["resnet18", "resnet34"], "widths": "0.5:1.0"}, "applies to --mode mutualnet only"),
        ({"mode": "dml", "nets": ["resnet18"]}, "at least two nets"),
        ({"eval_widths": [0.5, 1.2]}, "eval_widths"),
    ],
)
def test_config_errors_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(XrossError, match=message):
        TrainConfig.from_dict({"mode": "mutualnet", "nets": ["resnet18"], **options})


@pytest.mark.slow
def test_sigint_then_resume_is_bit_identical_and_the_run_is_queried(tmp_path, cifar10_archive, data_cache, cli) -> None:
    straight = tmp_path / "straight"
    code, out, err = finish(xross(*mutualnet_args(cifar10_archive, data_cache, straight)))
    assert code == 0, err
    assert "0.25-24" in out  # the table of every setting is printed at the end
    interrupted = tmp_path / "interrupted"
    code, _, err = interrupt_after_steps(xross(*mutualnet_args(cifar10_archive, data_cache, interrupted)), interrupted)
    assert code == 130, err
    code, _, err = finish(xross("train", "--resume", "--out", str(interrupted), "--no-progress"))
    assert code == 0, err
    a, b = final_state(straight), final_state(interrupted)
    assert a["position"] == b["position"]
    assert_same_tensors(a["slim"], b["slim"])
    for name in ("steps.csv", "eval.json"):
        assert (straight / name).read_text() == (interrupted / name).read_text(), name

    # the evaluated grid: 3 widths x 2 resolutions, cheaper settings cost fewer FLOPs
    rows = json.loads((straight / "eval.json").read_text())["paths"]
    assert len(rows) == 6 and {r["role"] for r in rows} == {"setting"}
    flops = {(r["width"], r["resolution"]): r["flops"] for r in rows}
    assert flops[0.25, 24] < flops[0.5, 24] < flops[1.0, 24] < flops[1.0, 32]

    r = cli("xross", "eval", straight)  # again from the checkpoint: the same numbers
    assert r.code == 0, r
    assert json.loads((straight / "eval.json").read_text())["paths"] == rows
    r = cli("xross", "table", straight)
    assert r.code == 0 and (straight / "query.csv").is_file() and (straight / "query.png").is_file(), r
    r = cli("xross", "best", straight, "--max-latency", "5ms")
    assert r.code == 2 and "xross profile" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("xross", "profile", straight, "--repeats", "2", "--batch", "4")
    assert r.code == 0, r
    assert set(json.loads((straight / "latency.json").read_text())["entries"]) == {row["name"] for row in rows}
    cheapest = min(rows, key=lambda row: row["flops"])
    r = cli("xross", "best", straight, "--max-flops", str(int(cheapest["flops"])))
    assert r.code == 0 and cheapest["name"] in r.out, r
    r = cli("xross", "best", straight, "--max-flops", "1k")
    assert r.code == 2 and "nothing fits the budget" in r.err

    exported = tmp_path / "small"
    r = cli("xross", "export", straight, "--width", "0.5", "--resolution", "24", "--out", exported)
    assert r.code == 0, r
    pieces = surgery.load(exported).eval()
    assert len(pieces) == 2  # cut at the run's cut point
    cfg, slim = load_slim(straight)
    calibrate(slim, calibration_images(cfg), 0.5, 24)  # the statistics the export was calibrated with
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(pieces(x), slim.extract(0.5, (24, 24)).eval()(x))
        assert (pieces(x) - slim.extract(0.5).eval()(x)).abs().max() > 1e-3  # not the full network's statistics
    assert pieces[0].get_submodule("conv1").out_channels == 32
    r = cli("xross", "export", straight, "--width", "1.5", "--resolution", "24", "--out", tmp_path / "x")
    assert r.code == 2 and "outside (0, 1]" in r.err and not (tmp_path / "x").exists()


def test_resolution_the_net_cannot_take_is_one_line(tmp_path, cifar10_archive, data_cache, cli) -> None:
    args = mutualnet_args(cifar10_archive, data_cache, tmp_path / "run")
    args[args.index("resnet18")] = "timm:vit_tiny_patch16_224(img_size=32, patch_size=8)"  # a fixed input size
    r = cli("xross", *args)
    assert r.code == 2 and "resolution 24" in r.err and "--resolutions" in r.err
    assert not (tmp_path / "run").exists()
