"""The ``xross`` command line (xross.cli): train, eval, best, export; bad input and damaged data: one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

import surgery
from surgery.graph.flops import human
from xross.run.config import TrainConfig
from xross.run.evaluate import EvalResult

FLOPS_NOTE = "FLOPs per sample: forward FLOPs counted on float32:1x3x32x32"


def test_train_eval_best_export_cli(cli, tmp_path, cifar10_archive, data_cache) -> None:
    run = tmp_path / "x1"
    r = cli(
        "xross",
        "train",
        "--nets",
        "resnet34,resnet18",
        "--cut",
        "layer2",
        "--mode",
        "xml",
        "--data",
        cifar10_archive,
        "--subset",
        "512",
        "--eval-subset",
        "128",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--lr",
        "1e-3",
        "--cache-dir",
        data_cache,
        "--out",
        run,
        "--no-progress",
    )
    assert r.code == 0, r
    assert "ensembles" in r.out  # (the paths' names: in eval.json below; a table cell wraps in 80 columns)
    for name in ("config.yaml", "command.txt", "versions.json", "steps.csv", "epochs.csv", "eval.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "checkpoints").glob("step-*.pt"))) == 2
    assert TrainConfig.load(run / "config.yaml").num_classes == 10
    steps = (run / "steps.csv").read_text().splitlines()
    first, last = (dict(zip(steps[0].split(","), row.split(","))) for row in (steps[1], steps[-1]))
    assert float(last["loss0"]) < float(first["loss0"])  # it learns

    r = cli("xross", "eval", run)
    assert r.code == 0, r
    assert f"{FLOPS_NOTE}\n" in r.out  # FLOPs per sample, on the input they were counted on, as every table says
    result = EvalResult.load(run / "eval.json")
    assert len(result.paths) == 4 and result.samples == 128 and result.split == "test"
    assert {p.name for p in result.paths} == {
        f"{a} > {b}" for a in ("resnet34", "resnet18") for b in ("resnet34", "resnet18")
    }
    assert set(result.ensembles) == {"nets", "all_paths"}
    own18 = next(p for p in result.paths if p.path == (1, 1))
    assert 11e6 < own18.params < 11.3e6 and own18.flops > 0

    r = cli("xross", "best", run, "--max-params", "12M")
    fits = [p for p in result.paths if p.params <= 12e6]
    assert {p.path for p in fits} == {(1, 1), (0, 1)}  # resnet18's down half is the small one
    chosen = max(fits, key=lambda p: (p.top1, -p.params))
    assert r.code == 0 and f"best path {chosen.path[0]},{chosen.path[1]} " in r.out, r
    assert f"{human(chosen.flops)} FLOPs per sample on float32:1x3x32x32" in r.out
    r = cli("xross", "best", run, "--max-params", "1M")
    assert r.code == 2 and "nothing fits the budget" in r.err

    r = cli("xross", "profile", run, "--repeats", "2", "--batch", "2")  # every path and piece timed
    assert r.code == 0 and FLOPS_NOTE in r.out, r
    latency = json.loads((run / "latency.json").read_text())["entries"]
    pieces = {f"part_n{i}_p{k}" for i in (0, 1) for k in (0, 1)}  # no adapters: 128 channels on both sides
    assert set(latency) == {p.name for p in result.paths} | pieces
    fastest = min(result.paths, key=lambda p: latency[p.name]["ms_batch1"])
    budget = latency[fastest.name]["ms_batch1"] * 1.0001
    r = cli("xross", "best", run, "--max-latency", f"{budget}ms")
    assert r.code == 0 and ",".join(map(str, fastest.path)) in r.out, r

    r = cli("xross", "export", run, "--path", "0,1", "--out", tmp_path / "hybrid")
    assert r.code == 0, r
    hybrid = surgery.load(tmp_path / "hybrid").eval()
    assert hybrid(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cut", "layer22"], "closest: layer2"),
        (["--cut", "layer1,layer2,layer3"], "names 3 points but there are 2 nets"),
        (["--mode", "xmll"], "'xmll' is not one of 'independent', 'kd', 'dml', 'xml'"),
        (["--data", "/nonexistent/cifar.tar.xz"], "does not exist"),
        (["--optimizer", "rmsprop"], "'rmsprop' is not one of 'sgd', 'adam', 'adamw'"),
    ],
)
def test_train_bad_input(cli, tmp_path, cifar10_archive, data_cache, args, message) -> None:
    base = [
        "--nets",
        "resnet18,resnet34",
        "--cut",
        "layer2",
        "--data",
        str(cifar10_archive),
        "--subset",
        "64",
        "--epochs",
        "1",
        "--cache-dir",
        str(data_cache),
        "--out",
        str(tmp_path / "bad"),
        "--no-progress",
    ]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    r = cli("xross", "train", *base)
    assert r.code == 2, r
    assert message in r.err and "Traceback" not in r.err


def test_corrupt_archive_and_existing_run_dir(cli, tmp_path, cifar10_archive, data_cache) -> None:
    broken = tmp_path / "broken.tar.xz"
    broken.write_bytes(cifar10_archive.read_bytes()[: min(cifar10_archive.stat().st_size // 2, 1 << 20)])
    r = cli(
        "xross",
        "train",
        "--data",
        broken,
        "--subset",
        "64",
        "--out",
        tmp_path / "a",
        "--cache-dir",
        data_cache,
        "--no-progress",
    )
    assert r.code == 2 and "corrupt or truncated" in r.err
    run = tmp_path / "existing"
    run.mkdir()
    (run / "mine.txt").write_text("keep")
    r = cli("xross", "train", "--data", cifar10_archive, "--out", run, "--no-progress")
    assert r.code == 2 and "--resume" in r.err and "--force" in r.err
    assert (run / "mine.txt").read_text() == "keep"
    r = cli("xross", "train", "--data", cifar10_archive, "--out", tmp_path / "none", "--resume", "--no-progress")
    assert r.code == 2 and "cannot resume" in r.err
    (run / "config.yaml").write_text(TrainConfig(out=str(run)).to_yaml())
    r = cli("xross", "train", "--resume", "--out", run, "--mode", "dml", "--no-progress")
    assert r.code == 2 and "drop --mode" in r.err


def imagenet_layout(root, per_class: tuple[int, int] = (8, 2)):
    """A tiny generated dataset in ImageNet's own layout: ``train/`` and ``val/`` (no ``test/``), 3 classes."""
    from xross.data.synthetic import write_synthetic

    write_synthetic(root, train_per_class=per_class[0], test_per_class=per_class[1], classes=("a", "b", "c"))
    (root / "test").rename(root / "val")
    return root


def test_one_net_trains_resumes_and_evaluates_on_val(cli, tmp_path, data_cache) -> None:
    """`xross train --nets resnet18 --mode independent` on train/ + val/: trains, resumes bit for bit after
    SIGINT mid-epoch, says it evaluated val/, and `eval`, `best`, `export` take the one-net run."""
    from helpers import assert_same_tensors, final_state, interrupt_after_steps, xross

    data = imagenet_layout(tmp_path / "imagenet")
    args = "train --nets resnet18 --mode independent --batch-size 4 --epochs 1 --log-every 1 --no-progress".split()
    args += ["--threads", "1", "--data", str(data), "--cache-dir", str(data_cache)]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    r = cli("xross", *args, "--out", straight)
    assert r.code == 0, r
    out = " ".join(r.out.split())  # as one line: the table title may wrap
    assert "(6 images of the val split)" in out  # the title names the split (it may wrap inside the run's path)
    assert "ensembles" not in out  # one net: no ensemble to show
    result = EvalResult.load(straight / "eval.json")
    assert result.split == "val" and [(p.path, p.name) for p in result.paths] == [((0, 0), "resnet18 > resnet18")]

    code, _, err = interrupt_after_steps(xross(*args, "--out", str(interrupted)), interrupted, steps=2)
    assert code == 130 and "--resume" in err, err
    assert final_state(interrupted)["position"]["step"] < 6  # stopped mid-epoch (6 steps)
    r = cli("xross", "train", "--resume", "--out", interrupted, "--no-progress")
    assert r.code == 0, r
    assert_same_tensors(final_state(straight)["cohort"], final_state(interrupted)["cohort"])
    assert (straight / "eval.json").read_text() == (interrupted / "eval.json").read_text()

    r = cli("xross", "eval", interrupted)
    assert r.code == 0 and "6 images of the val split" in " ".join(r.out.split()), r
    r = cli("xross", "best", interrupted, "--max-params", "12M")
    assert r.code == 0 and "best path 0,0 " in r.out, r
    r = cli("xross", "export", interrupted, "--path", "0,0", "--out", tmp_path / "alone")
    assert r.code == 0, r
    assert surgery.load(tmp_path / "alone").eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)

    r = cli("xross", "profile", interrupted, "--repeats", "3", "--batch", "2")
    assert r.code == 0 and "spread" in r.out and "interquartile range" in " ".join(r.out.split()), r
    latency = json.loads((interrupted / "latency.json").read_text())
    assert "cpu_load" in latency and set(latency["entries"]) == {"resnet18 > resnet18", "part_n0_p0", "part_n0_p1"}
    for entry in latency["entries"].values():  # steady figures, but one image 6x slower than 32 (the issue's)
        entry.update(ms_batch1=2.0, ms_batch=20.0, batch=32, iqr_batch1=0.0, iqr_batch=0.0)
    latency["entries"]["resnet18 > resnet18"].update(ms_batch1=528.0, ms_batch=87.0)
    latency["cpu_load"] = 0.0
    (interrupted / "latency.json").write_text(json.dumps(latency))
    r = cli("xross", "best", interrupted, "--max-latency", "1s")
    assert r.code == 0 and "best path 0,0 " in r.out, r
    assert "1 of 3 entries are unsteady (e.g. resnet18 > resnet18: batch 1 slower than batch 32)" in r.err, r
    assert len(r.err.strip().splitlines()) == 1 and r.err.startswith("warning: latency figures of")

    r = cli("xross", *args[:4], "dml", *args[5:], "--out", tmp_path / "dml")
    assert r.code == 2 and "mode dml learns from peers: give at least two nets in --nets" in r.err, r
    assert "file" not in r.err and "see `xross train --help`" in r.err
