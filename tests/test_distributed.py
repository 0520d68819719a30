"""xross.run.distributed: torchrun with two CPU processes (gloo) matches one process, and resumes bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, assert_same_tensors, final_state, finish, xross

from xross.run.config import TrainConfig
from xross.run.directory import build_cohort
from xross.run.evaluate import EvalResult


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


def torchrun(*args: str, nproc: int = 2) -> str:
    """`torchrun --nproc_per_node=N -m xross ARGS` on CPU (gloo); fails the test with its stderr if it fails,
    else returns the stderr."""
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
    return done.stderr


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, cifar10_archive, data_cache) -> None:
    # float64: a freshly initialised ResNet's float32 gradients are ill-conditioned on some batches
    # (plain BatchNorm2d differs from float64 by up to a few 1e-3 there), which would swamp a 1e-5 check
    common = ddp_args(cifar10_archive, data_cache, "--dtype", "float64", "--eval-subset", "48", "--epochs", "1")
    code, _, err = finish(xross(*common, "--out", str(tmp_path / "one")))
    assert code == 0, err
    torchrun(*common, "--out", str(tmp_path / "two"))
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert one["position"] == two["position"] == {**one["position"], "epoch": 1, "step": 0, "global_step": 4}
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
def test_torchrun_distillation_matches_one_process(tmp_path, synthetic_archive, data_cache) -> None:
    from surgery.cli.kit import run_app
    from xross.cli.main import app

    vgg = "growth.models:small_vgg"
    data = ["--data", str(synthetic_archive), "--image-size", "32", "--cache-dir", str(data_cache), "--epochs", "1"]
    data += ["--no-progress"]
    teacher = tmp_path / "xml"
    with pytest.raises(SystemExit) as e:
        run_app(
            app,
            ["train", "--nets", f"{vgg},{vgg}", "--cut", "features.1", "--subset", "64", "--out", str(teacher)] + data,
        )
    assert e.value.code == 0
    common = ["distill", "--student", f"{teacher}@1-0", "--teacher", str(teacher), "--teacher-paths", "all"]
    common += [
        "--subset",
        "128",
        "--batch-size",
        "32",
        "--eval-subset",
        "40",
        "--dtype",
        "float64",
        "--eval-every",
        "0",
    ]
    common += ["--lr", "1e-3", *data]
    code, _, err = finish(xross(*common, "--out", str(tmp_path / "one")))
    assert code == 0, err
    torchrun(*common, "--out", str(tmp_path / "two"))
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert one["position"] == two["position"] == {**one["position"], "epoch": 1, "step": 0, "global_step": 4}
    for part in ("student", "discriminator"):
        worst = max(
            (one[part][k] - two[part][k]).abs().max().item() for k in one[part] if one[part][k].is_floating_point()
        )
        assert worst <= 1e-9, (part, worst)
    e1, e2 = EvalResult.load(tmp_path / "one" / "eval.json"), EvalResult.load(tmp_path / "two" / "eval.json")
    assert [(r.name, r.top1) for r in e1.paths] == [(r.name, r.top1) for r in e2.paths]
    assert e1.ensembles == e2.ensembles and e1.samples == e2.samples == 40


@pytest.mark.slow
def test_torchrun_mutualnet_matches_one_process(tmp_path, synthetic_archive, data_cache) -> None:
    common = ["train", "--mode", "mutualnet", "--nets", "growth.models:small_vgg", "--widths", "0.25:1.0"]
    common += ["--data", str(synthetic_archive), "--cache-dir", str(data_cache), "--subset", "128"]
    common += ["--batch-size", "32", "--eval-subset", "40", "--bn-batches", "2", "--dtype", "float64"]
    common += ["--optimizer", "sgd", "--lr", "0.05", "--epochs", "1", "--eval-every", "0", "--no-progress"]
    code, _, err = finish(xross(*common, "--out", str(tmp_path / "one")))
    assert code == 0, err
    torchrun(*common, "--out", str(tmp_path / "two"))
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert one["position"] == two["position"] == {**one["position"], "epoch": 1, "step": 0, "global_step": 4}
    worst = max((one["slim"][k].float() - two["slim"][k].float()).abs().max().item() for k in one["slim"])
    assert worst <= 1e-5, worst
    # every setting recalibrated on the same images: global BatchNorm statistics over the ranks' halves
    e1, e2 = EvalResult.load(tmp_path / "one" / "eval.json"), EvalResult.load(tmp_path / "two" / "eval.json")
    assert [(r.name, r.top1) for r in e1.paths] == [(r.name, r.top1) for r in e2.paths]


RECALIBRATE = """
import sys, torch, torch.distributed as dist, torchvision
from safetensors.torch import save_file
import surgery
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
net = torchvision.models.resnet18(num_classes=10).double()
batches = [torch.randn(8, 3, 16, 16, dtype=torch.float64) for _ in range(3)]
halves = [b[rank * 8 // world : (rank + 1) * 8 // world] for b in batches]  # this rank's slice of each batch
surgery.recalibrate_bn(net, halves)
save_file({k: v for k, v in net.state_dict().items() if "running" in k}, f"{sys.argv[1]}/rank{rank}.safetensors")
"""


def test_recalibrate_bn_under_torchrun_equals_one_process_on_the_whole_batches(tmp_path) -> None:
    """surgery.recalibrate_bn, each of 2 gloo ranks given its half of every batch: every rank ends with the
    statistics one process computes on the whole batches (and not those of its own half)."""
    import torchvision
    from safetensors.torch import load_file

    import surgery

    (tmp_path / "recalibrate.py").write_text(RECALIBRATE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*command, str(tmp_path / "recalibrate.py"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).double()
    batches = [torch.randn(8, 3, 16, 16, dtype=torch.float64) for _ in range(3)]
    one = {k: v.clone() for k, v in surgery.recalibrate_bn(net, batches).state_dict().items() if "running" in k}
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert_same_tensors(ranks[0], ranks[1])  # every rank holds the same statistics
    assert ranks[0].keys() == one.keys() and len(one) == 2 * 20
    for k in one:
        assert torch.allclose(ranks[0][k], one[k], rtol=1e-12, atol=1e-12), k
    half = surgery.recalibrate_bn(net, [b[:4] for b in batches]).state_dict()  # what a rank alone would find
    assert not torch.allclose(half["layer4.1.bn2.running_var"], one["layer4.1.bn2.running_var"], rtol=0.1)
