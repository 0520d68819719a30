"""xross.trainer on a CIFAR-10 archive (generated, or $CIFAR10_ARCHIVE; small subsets, CPU).

Train steps (who learns in whose step), KD from saved teachers, a run repeated from its config
file; and long runs: SIGINT mid-epoch then resume bit for bit, damaged checkpoints, NaN stops,
determinism.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, final_state, finish, interrupt_after_steps, xross

import surgery
from xross.data import Augment
from xross.errors import TrainingDiverged, XrossError
from xross.methods.trainer import Trainer, term_groups
from xross.run.checkpoint import CheckpointDir, read_checkpoint
from xross.run.config import TrainConfig
from xross.run.metrics import read_metrics


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
        mean = torch.stack([t(images).div(2.0).softmax(1) for t in trainer.teachers.sources]).mean(0)
    assert torch.allclose(target.div(2.0).softmax(1), mean, atol=1e-6)
    losses = trainer.train_step(images, labels)
    assert set(losses[0].terms) == {"ce", "kd"}
    with pytest.raises(ValueError, match="mode kd needs a teacher"):  # the config itself refuses it
        small_config(tmp_path / "b", cifar10_archive, data_cache, mode="kd")


def test_one_net_learns_from_a_teacher_alone(tmp_path, cifar10_archive, data_cache) -> None:
    """kd with a single student net: its own path learns from the teacher; nothing else is trained."""
    vgg = "growth.models:small_vgg(widths=[8, 16], image_size=32)"
    torch.manual_seed(0)
    teacher = str(surgery.save(surgery.refs.load(vgg, num_classes=10), tmp_path / "teacher"))
    cfg = small_config(tmp_path, cifar10_archive, data_cache, nets=[vgg], cuts=["features.0"], mode="kd",
                       teacher=[teacher], subset=32, eval_subset=20, optimizer="sgd", lr=0.1)  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    assert trainer.cohort.num_nets == 1 and trainer.cohort.paths() == [(0, 0)]
    before = snapshot(trainer.cohort)
    losses = trainer.train_step(*first_batch(trainer))
    assert list(losses) == [0] and set(losses[0].terms) == {"ce", "kd"}
    assert not params_equal(trainer.cohort, before)
    result = trainer.fit()
    assert [p.path for p in result.paths] == [(0, 0)] and result.split == "test"


# --- long runs: interrupt and resume, damaged checkpoints, NaN stops, determinism -------------------------------------


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


@pytest.mark.slow
def test_sigint_mid_epoch_then_resume_is_bit_identical(tmp_path, cifar10_archive, data_cache) -> None:
    # warm the decoded-data cache so both runs start alike
    straight = tmp_path / "straight"
    code, _, err = finish(xross(*train_args(cifar10_archive, data_cache, straight)))
    assert code == 0, err

    interrupted = tmp_path / "interrupted"
    p = xross(*train_args(cifar10_archive, data_cache, interrupted))
    code, _, err = interrupt_after_steps(p, interrupted)
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


def test_metrics_log_loss_terms_and_cka_and_augment_off_only_normalises(tmp_path, cifar10_archive, data_cache) -> None:
    cfg = small_config(
        tmp_path, cifar10_archive, data_cache, nets=["resnet18", "resnet18"], augment=False, cka_images=24,
        eval_every=1, subset=64,
    )  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    loader = trainer.train_loader
    order_images = [x for x, _ in loader.epoch(0)]
    again = [x for x, _ in loader.epoch(0)]
    assert all(torch.equal(a, b) for a, b in zip(order_images, again))
    flat = torch.cat(order_images).flatten(1)
    normalised = Augment()(loader.images, train=False).flatten(1)
    assert all(bool((normalised == row).all(1).any()) for row in flat)  # every batch row is an unaltered image
    trainer.fit()
    steps = read_metrics(tmp_path / "run", "steps")
    assert {"ce0", "kl0", "cross_ce0", "cross_kl0", "ce1", "kl1", "cross_ce1", "cross_kl1"} <= set(steps[0])
    epochs = read_metrics(tmp_path / "run", "epochs")
    assert 0 < epochs[-1]["cka_b0_0v1"] <= 1  # two resnet18s: same shapes, no adapter between them


def test_term_groups_average_the_cross_paths_terms() -> None:
    terms = {k: torch.tensor(v) for k, v in {"ce": 2.0, "kl": 0.5, "ce@0-1": 3.0, "ce@1-0": 1.0, "kl@0-1": 0.2,
                                               "kl@1-0": 0.4}.items()}  # fmt: skip
    assert term_groups(terms) == pytest.approx({"ce": 2.0, "kl": 0.5, "cross_ce": 2.0, "cross_kl": 0.3})
