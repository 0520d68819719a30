"""The xross trainer and CLI on a CIFAR-10 archive (generated, or $CIFAR10_ARCHIVE; small subsets, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import surgery
from xross.config import TrainConfig
from xross.evaluate import EvalResult
from xross.trainer import Trainer


def small_config(tmp_path: Path, cifar10_archive: Path, data_cache: Path, **over) -> TrainConfig:
    base = dict(
        nets=["resnet18", "resnet34"],
        cuts=["layer2"],
        mode="xml",
        data=str(cifar10_archive),
        subset=128,
        eval_subset=64,
        batch_size=32,
        epochs=1,
        cache_dir=str(data_cache),
        out=str(tmp_path / "run"),
        eval_every=0,
    )
    return TrainConfig(**{**base, **over})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def params_equal(a: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in a.named_parameters())


def first_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(trainer.train_loader.epoch(0)))


def test_alternate_step_leaves_teacher_bit_identical(tmp_path, cifar10_archive, data_cache) -> None:
    cfg = small_config(tmp_path, cifar10_archive, data_cache, nets=["resnet18", "resnet50"], optimizer="sgd", lr=0.1)
    trainer = Trainer(cfg, progress=False)
    net0, net1 = trainer.cohort.nets
    before0, before1 = snapshot(net0), snapshot(net1)
    adapters = {k: snapshot(a) for k, a in trainer.cohort.adapters.items()}
    trainer.train_step(*first_batch(trainer), students=[0])
    assert params_equal(net1, before1), "the teacher's parameters moved in the student's step"
    assert not params_equal(net0, before0)
    # the student's cross paths run through both adapters; with adapter_update=student both learn
    assert all(not params_equal(a, adapters[k]) for k, a in trainer.cohort.adapters.items())


def test_joint_schedule_updates_every_part_on_a_cross_path(tmp_path, cifar10_archive, data_cache) -> None:
    cfg = small_config(tmp_path, cifar10_archive, data_cache, schedule="joint", optimizer="sgd", lr=0.1)
    trainer = Trainer(cfg, progress=False)
    before1 = snapshot(trainer.cohort.nets[1])
    trainer.train_step(*first_batch(trainer), students=[0])  # only student 0's loss
    assert not params_equal(trainer.cohort.nets[1], before1)  # reached net 1 through the cross paths


def test_cpu_accepts_gpu_flags(tmp_path, cifar10_archive, data_cache, capsys) -> None:
    cfg = small_config(
        tmp_path, cifar10_archive, data_cache, amp="bf16", channels_last=True, compile=True, mode="dml", subset=64
    )
    result = Trainer(cfg, progress=False).fit()
    assert "works on CUDA only" in capsys.readouterr().err
    assert len(result.paths) == 4 and all(0 <= r.top1 <= 100 for r in result.paths)


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
    assert "resnet34 > resnet18" in r.out and "ensembles" in r.out
    for name in ("config.yaml", "command.txt", "versions.json", "steps.csv", "epochs.csv", "eval.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "checkpoints").glob("step-*.pt"))) == 2
    assert TrainConfig.load(run / "config.yaml").num_classes == 10
    steps = (run / "steps.csv").read_text().splitlines()
    first, last = (dict(zip(steps[0].split(","), row.split(","))) for row in (steps[1], steps[-1]))
    assert float(last["loss0"]) < float(first["loss0"])  # it learns

    r = cli("xross", "eval", run)
    assert r.code == 0, r
    result = EvalResult.load(run / "eval.json")
    assert len(result.paths) == 4 and result.samples == 128
    assert set(result.ensembles) == {"nets", "all_paths"}
    own18 = next(p for p in result.paths if p.path == (1, 1))
    assert 11e6 < own18.params < 11.3e6 and own18.flops > 0

    r = cli("xross", "best", run, "--max-params", "12M")
    fits = [p for p in result.paths if p.params <= 12e6]
    assert {p.path for p in fits} == {(1, 1), (0, 1)}  # resnet18's down half is the small one
    chosen = max(fits, key=lambda p: (p.top1, -p.params))
    assert r.code == 0 and f"best path {chosen.path[0]},{chosen.path[1]} " in r.out, r
    r = cli("xross", "best", run, "--max-params", "1M")
    assert r.code == 2 and "no path fits" in r.err

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


def test_eval_json_round_trip(tmp_path) -> None:
    from xross.evaluate import PathResult, best_path, pareto_front

    rows = [
        ((0, 0), "a>a", 70, 90, 21e6, 3e9),
        ((0, 1), "a>b", 69, 89, 15e6, 2e9),
        ((1, 0), "b>a", 66, 88, 17e6, 2.5e9),
        ((1, 1), "b>b", 68, 89, 11e6, 1e9),
    ]
    paths = [PathResult(path=p, name=n, top1=t1, top5=t5, params=int(c), flops=f) for p, n, t1, t5, c, f in rows]
    result = EvalResult.model_validate(
        {"paths": [r.model_dump() for r in paths], "ensembles": {"nets": {"top1": 71.0, "top5": 91.0}}, "samples": 100}
    )
    result.save(tmp_path / "e.json")
    assert EvalResult.load(tmp_path / "e.json") == result
    assert [r.path for r in pareto_front(paths)] == [(1, 1), (0, 1), (0, 0)]
    assert best_path(paths, max_params=16e6).path == (0, 1)
    assert best_path(paths, max_flops=1.5e9).path == (1, 1)
    assert json.loads((tmp_path / "e.json").read_text())["samples"] == 100


def test_config_file_repeats_a_run(cli, tmp_path, cifar10_archive, data_cache) -> None:
    first = tmp_path / "first"
    r = cli(
        "xross",
        "train",
        "--nets",
        "resnet18,resnet18",
        "--cut",
        "layer2",
        "--mode",
        "dml",
        "--data",
        cifar10_archive,
        "--subset",
        "64",
        "--eval-subset",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--cache-dir",
        data_cache,
        "--out",
        first,
        "--no-progress",
    )
    assert r.code == 0, r
    again = tmp_path / "again"
    r = cli("xross", "train", "--config", first / "config.yaml", "--out", again, "--no-progress")
    assert r.code == 0, r
    for name in ("steps.csv", "epochs.csv", "eval.json"):
        assert (first / name).read_text() == (again / name).read_text(), name
    assert TrainConfig.load(again / "config.yaml").out == str(again)


def test_kd_from_a_saved_teacher_ensemble(tmp_path, cifar10_archive, data_cache) -> None:
    teachers = []
    for k, name in enumerate(("resnet18", "resnet34")):
        torch.manual_seed(k)
        teachers.append(str(surgery.save(surgery.build_model(name, num_classes=10), tmp_path / f"teacher{k}")))
    cfg = small_config(tmp_path, cifar10_archive, data_cache, mode="kd", teacher=teachers, temperature=2.0, subset=64)
    trainer = Trainer(cfg, progress=False)
    images, labels = first_batch(trainer)
    target = trainer.teacher_logits(images)
    with torch.no_grad():  # the target's softmax at T is the teachers' mean softmax at T
        mean = torch.stack([t(images).div(2.0).softmax(1) for t in trainer.teachers]).mean(0)
    assert torch.allclose(target.div(2.0).softmax(1), mean, atol=1e-6)
    losses = trainer.train_step(images, labels)
    assert set(losses[0].terms) == {"ce", "kd"}
    with pytest.raises(ValueError, match="mode kd needs a teacher"):  # the config itself refuses it
        small_config(tmp_path / "b", cifar10_archive, data_cache, mode="kd")
