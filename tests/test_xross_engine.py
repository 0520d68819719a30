"""Long-run engineering: interrupt + resume, damaged checkpoints, NaN stops, torchrun, determinism."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xross.checkpoint import CheckpointDir, read_checkpoint
from xross.config import TrainConfig
from xross.errors import TrainingDiverged, XrossError
from xross.evaluate import EvalResult
from xross.trainer import Trainer, build_cohort

ROOT = Path(__file__).resolve().parents[1]


def train_args(archive: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--nets",
        "resnet18,resnet34",
        "--cut",
        "layer2",
        "--mode",
        "xml",
        "--data",
        str(archive),
        "--subset",
        "256",
        "--eval-subset",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--cache-dir",
        str(cache),
        "--threads",
        "1",
        "--log-every",
        "1",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def xross(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "xross", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def ddp_args(archive: Path, cache: Path, *extra: str) -> list[str]:
    """A small XML run (4 global steps of 32 per epoch) for the one- vs two-process comparisons."""
    return [
        "train",
        "--nets",
        "resnet18,resnet34",
        "--cut",
        "layer2",
        "--mode",
        "xml",
        "--data",
        str(archive),
        "--subset",
        "128",
        "--batch-size",
        "32",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--eval-every",
        "0",
        *extra,
    ]


def torchrun(*args: str, nproc: int = 2) -> None:
    """`torchrun --nproc_per_node=N -m xross ARGS` on CPU (gloo); fails the test with its stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "xross",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def rows(csv: Path) -> int:
    return max(len(csv.read_text().splitlines()) - 1, 0) if csv.exists() else 0


def final_state(run: Path) -> dict:
    return read_checkpoint(CheckpointDir(run).latest())


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sigint_mid_epoch_then_resume_is_bit_identical(tmp_path, cifar10_archive, data_cache) -> None:
    # warm the decoded-data cache so both runs start alike
    straight = tmp_path / "straight"
    code, _, err = finish(xross(*train_args(cifar10_archive, data_cache, straight)))
    assert code == 0, err

    interrupted = tmp_path / "interrupted"
    p = xross(*train_args(cifar10_archive, data_cache, interrupted))
    deadline = time.time() + 240
    while rows(interrupted / "steps.csv") < 3 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    code, _, err = finish(p)
    assert code == 130, err
    assert "SIGINT" in err and "--resume" in err and "Traceback" not in err
    position = final_state(interrupted)["position"]
    assert position["epoch"] == 0 and 3 <= position["step"] < 8, position  # mid-epoch (8 steps per epoch)

    resume = ["train", "--resume", "--out", str(interrupted), "--no-progress"]  # everything else comes from the run
    code, _, err = finish(xross(*resume))
    assert code == 0, err
    a, b = final_state(straight), final_state(interrupted)
    assert a["position"] == b["position"]
    assert_same_tensors(a["cohort"], b["cohort"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        for name, value in a["optimizer"]["state"][k].items():
            assert torch.equal(value, b["optimizer"]["state"][k][name])
    for name in ("steps.csv", "epochs.csv", "eval.json"):
        assert (straight / name).read_text() == (interrupted / name).read_text(), name


def small(tmp_path: Path, archive: Path, cache: Path, **over) -> TrainConfig:
    base = dict(
        nets=["resnet18", "resnet18"],
        cuts=["layer2"],
        mode="dml",
        data=str(archive),
        subset=64,
        eval_subset=32,
        batch_size=32,
        epochs=2,
        cache_dir=str(cache),
        out=str(tmp_path / "run"),
        log_every=1,
    )
    return TrainConfig(**{**base, **over})


def test_truncated_checkpoint_is_reported_and_the_previous_one_loads(tmp_path, cifar10_archive, data_cache) -> None:
    cfg = small(tmp_path, cifar10_archive, data_cache)
    Trainer(cfg, progress=False).fit()
    older, newest = CheckpointDir(Path(cfg.out)).files()
    newest.write_bytes(newest.read_bytes()[:5000])
    with pytest.raises(XrossError, match="truncated or corrupt"):
        read_checkpoint(newest)
    assert read_checkpoint(older)["position"]["epoch"] == 1
    with pytest.warns(UserWarning, match="loaded the previous one"):
        resumed = Trainer(small(tmp_path, cifar10_archive, data_cache), resume=True, progress=False)
    assert resumed.position.epoch == 1 and resumed.position.global_step == 2


def test_nan_stops_with_the_term_and_keeps_the_last_checkpoint(tmp_path, cifar10_archive, data_cache) -> None:
    cfg = small(tmp_path, cifar10_archive, data_cache, epochs=1)
    Trainer(cfg, progress=False).fit()
    ckpts = CheckpointDir(Path(cfg.out))
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpts.files()}
    trainer = Trainer(small(tmp_path, cifar10_archive, data_cache, epochs=2), resume=True, progress=False)
    with torch.no_grad():
        trainer.cohort.part(1, 1).get_submodule("fc").weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    msg = str(err.value)
    # net 0's KL to net 1 is the first term to turn NaN; the message names it, the step and the checkpoint
    assert (
        "loss term 'kl' of net 0 (resnet18) is nan at epoch 2 step 1 (global step 3)" in msg
        and str(ckpts.latest()) in msg
    )
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpts.files()} == digest


def test_same_seed_gives_identical_metrics(tmp_path, cifar10_archive, data_cache) -> None:
    outs = []
    for name in ("a", "b"):
        cfg = small(tmp_path / name, cifar10_archive, data_cache, mode="xml", epochs=1)
        Trainer(cfg, progress=False).fit()
        outs.append(Path(cfg.out))
    for f in ("steps.csv", "epochs.csv", "eval.json"):
        assert (outs[0] / f).read_text() == (outs[1] / f).read_text(), f
    other = small(tmp_path / "c", cifar10_archive, data_cache, mode="xml", epochs=1, seed=1)
    Trainer(other, progress=False).fit()
    assert (Path(other.out) / "steps.csv").read_text() != (outs[0] / "steps.csv").read_text()


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, cifar10_archive, data_cache) -> None:
    # float64: a freshly initialised ResNet's float32 gradients are ill-conditioned on some batches
    # (plain BatchNorm2d differs from float64 by up to a few 1e-3 there), which would swamp a 1e-5 check
    common = ddp_args(cifar10_archive, data_cache, "--dtype", "float64", "--eval-subset", "48", "--epochs", "1")
    code, _, err = finish(xross(*common, "--out", str(tmp_path / "one")))
    assert code == 0, err
    torchrun(*common, "--out", str(tmp_path / "two"))
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert one["position"] == two["position"] == {"epoch": 1, "step": 0, "global_step": 4}
    worst = max((one["cohort"][k].float() - two["cohort"][k].float()).abs().max().item() for k in one["cohort"])
    assert worst <= 1e-5, worst
    initial = build_cohort(TrainConfig.load(tmp_path / "one" / "config.yaml"), torch.device("cpu")).state_dict()
    moved = max((one["cohort"][k].float() - v.float()).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3  # training really moved the weights, so the comparison means something
    # evaluation is sharded over the ranks (half of each batch, the last one short) and the counts summed
    e1, e2 = EvalResult.load(tmp_path / "one" / "eval.json"), EvalResult.load(tmp_path / "two" / "eval.json")
    assert e1.samples == e2.samples == 48
    assert [(r.path, r.top1, r.top5) for r in e1.paths] == [(r.path, r.top1, r.top5) for r in e2.paths]


@pytest.mark.slow
def test_torchrun_resume_is_bit_identical(tmp_path, cifar10_archive, data_cache) -> None:
    common = ddp_args(cifar10_archive, data_cache, "--eval-subset", "32")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(*common, "--epochs", "2", "--out", str(straight))
    torchrun(*common, "--epochs", "1", "--out", str(resumed))
    assert final_state(resumed)["position"]["epoch"] == 1
    torchrun("train", "--resume", "--out", str(resumed), "--epochs", "2", "--no-progress")
    a, b = final_state(straight), final_state(resumed)
    assert a["position"] == b["position"] == {"epoch": 2, "step": 0, "global_step": 8}
    assert_same_tensors(a["cohort"], b["cohort"])
    assert (straight / "steps.csv").read_text() == (resumed / "steps.csv").read_text()
