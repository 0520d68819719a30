"""xross.distill and `xross distill`: a student from a tiny XML cohort's stitched paths.

The run machinery (SIGINT then resume bit for bit), what a run records (student-init, the
discriminator in checkpoints, its loss and accuracy in steps.csv), eval/best/export of a
distillation run, and one-line refusals of bad teachers and students.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, final_state, finish, interrupt_after_steps
from helpers import xross as xross_process

import surgery
import xross
from surgery.cli.kit import run_app
from xross.cli.main import app
from xross.errors import XrossError
from xross.methods.distiller import Distiller
from xross.run.config import DistillConfig, load_config
from xross.run.directory import load_student
from xross.run.evaluate import EvalResult

VGG = "growth.models:small_vgg"


def _common(archive: Path, cache: Path) -> list[str]:
    return ["--data", str(archive), "--image-size", "32", "--cache-dir", str(cache), "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def xml_run(tmp_path_factory: pytest.TempPathFactory, synthetic_archive: Path) -> tuple[Path, Path]:
    """A one-epoch XML run of two small VGGs cut in two, and the data cache it filled."""
    tmp = tmp_path_factory.mktemp("distill")
    cache, run = tmp / "cache", tmp / "xml"
    args = ["train", "--nets", f"{VGG},{VGG}", "--cut", "features.1", "--mode", "xml", "--batch-size", "32"]
    with pytest.raises(SystemExit) as e:
        run_app(app, [*args, "--subset", "320", "--epochs", "1", "--out", str(run), *_common(synthetic_archive, cache)])
    assert e.value.code == 0
    return run, cache


def _distill_args(xml: Path, cache: Path, archive: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--student",
        f"{xml}@0-1",
        "--teacher",
        str(xml),
        "--teacher-paths",
        "all",
        "--subset",
        "320",
        "--eval-subset",
        "60",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--d-lr",
        "2e-3",
        "--log-every",
        "1",
        "--out",
        str(out),
        *_common(archive, cache),
        *extra,
    ]


@pytest.mark.slow
def test_sigint_then_resume_is_bit_identical_and_the_run_is_complete(xml_run, synthetic_archive, tmp_path) -> None:
    xml, cache = xml_run
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    code, _, err = finish(xross_process(*_distill_args(xml, cache, synthetic_archive, straight)))
    assert code == 0, err

    p = xross_process(*_distill_args(xml, cache, synthetic_archive, interrupted))
    code, _, err = interrupt_after_steps(p, interrupted)
    assert code == 130, err
    assert "xross distill --resume" in err and "Traceback" not in err
    stopped = final_state(interrupted)["position"]["global_step"]
    assert 3 <= stopped < 80, stopped  # 40 steps per epoch, 2 epochs

    code, _, err = finish(xross_process("distill", "--resume", "--out", str(interrupted), "--no-progress"))
    assert code == 0, err
    a, b = final_state(straight), final_state(interrupted)
    assert a["position"] == b["position"]
    assert_same_tensors(a["student"], b["student"])
    assert_same_tensors(a["discriminator"], b["discriminator"])
    for k in a["optimizer"]["state"]:  # the discriminator's group too
        for name, value in a["optimizer"]["state"][k].items():
            assert torch.equal(value, b["optimizer"]["state"][k][name])
    for name in ("steps.csv", "epochs.csv", "eval.json"):
        assert (straight / name).read_text() == (interrupted / name).read_text(), name

    # the discriminator's rate is d_lr throughout, the student's lr; its loss and accuracy are logged
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [1e-3, 2e-3]
    header = (straight / "steps.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "soft", "d_loss", "d_acc", "acc"} <= set(header) and "ce" not in header
    # the student started from the path's trained weights, kept in student-init
    init = surgery.load(straight / "student-init")
    path = surgery.refs.load(f"{xml}@0-1")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(init.eval()(x), path.eval()(x))
    evaluation = json.loads((straight / "eval.json").read_text())
    assert [r["role"] for r in evaluation["paths"]] == ["student"] + ["teacher"] * 4
    assert "teachers" in evaluation["ensembles"]


def test_eval_best_export_of_a_distillation_run(xml_run, synthetic_archive, tmp_path, cli) -> None:
    xml, cache = xml_run
    out = tmp_path / "d"
    args = _distill_args(
        xml,
        cache,
        synthetic_archive,
        out,
        "--discriminator",
        "grl",
        "--teacher-weights",
        "1,0,0,3",
        "--d-hidden",
        "8,4",
    )
    args[args.index("--epochs") + 1] = "1"
    args[args.index("--subset") + 1] = "40"
    result = cli("xross", *args)
    assert result.code == 0, result
    assert load_config(out / "config.yaml") == DistillConfig.load(out / "config.yaml")
    assert load_config(out / "config.yaml").teacher_weights == [1.0, 0.0, 0.0, 3.0]
    assert load_config(out / "config.yaml").d_hidden == [8, 4]

    result = cli("xross", "eval", str(out))
    assert result.code == 0, result
    evaluated = EvalResult.load(out / "eval.json")  # (the table's cells wrap on a narrow terminal)
    assert "student - ensemble" in result.out
    assert [p.role for p in evaluated.paths] == ["student"] + ["teacher"] * 4
    assert set(evaluated.ensembles) == {"teachers"}
    result = cli("xross", "best", str(out))
    assert result.code == 0 and result.out.startswith("the student"), result
    result = cli("xross", "export", str(out), "--out", str(tmp_path / "student"))
    assert result.code == 0, result
    _, student = load_student(out)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(surgery.load(tmp_path / "student").eval()(x), student(x))
    result = cli("xross", "export", str(out), "--out", str(tmp_path / "s2"), "--path", "0,1")
    assert result.code == 2 and "distillation run" in result.err and "drop --path" in result.err
    result = cli("xross", "train", "--resume", "--out", str(out))
    assert result.code == 2 and "xross distill --resume" in result.err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--student": "resnet18(num_classes=5)"}, "gives outputs of shape (2, 5) but the data has 10 classes"),
        ({"--teacher": "no/such/dir"}, "teacher 'no/such/dir' could not be loaded: 'no/such/dir': no such saved"),
        ({"--teacher-paths": "0-2"}, "teacher path 0-2 of"),
        ({"--teacher-paths": ""}, "should be all, full or a list of paths like 0-1,1-0"),
        ({"--teacher-weights": "1,2,3"}, "gives 3 weights but there are 4 teachers"),
        ({"--student": "RUN"}, "is an xross run directory, not one network; name one of its paths"),
        ({"--student": "resnet81"}, "unknown model 'resnet81'"),
        ({"--soft-weight": "0"}, "soft_weight and hard_weight are both 0"),
    ],
)
def test_bad_teachers_and_students_are_one_line(xml_run, synthetic_archive, tmp_path, cli, change, message) -> None:
    xml, cache = xml_run
    args = _distill_args(xml, cache, synthetic_archive, tmp_path / "d")
    for option, value in change.items():
        value = value.replace("RUN", str(xml))
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    result = cli("xross", *args)
    assert result.code == 2, result
    assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert not (tmp_path / "d").exists()  # a run that never started leaves nothing behind


def test_python_api_matches_the_config(xml_run, synthetic_archive, tmp_path) -> None:
    xml, cache = xml_run
    cfg = DistillConfig(
        student=f"{xml}@1-1",
        teacher=[str(xml)],
        data=str(synthetic_archive),
        image_size=32,
        cache_dir=str(cache),
        subset=20,
        eval_subset=20,
        batch_size=10,
        epochs=1,
        discriminator="off",
        hard_weight=0.5,
        out=str(tmp_path / "api"),
    )
    distiller = Distiller(cfg, progress=False)
    assert distiller.discriminator is None and len(distiller.optimizer.param_groups) == 1
    assert distiller.teachers.names == [f"{xml}@0-0", f"{xml}@1-1"]  # teacher_paths defaults to the full nets
    images, labels = next(iter(distiller.train_loader.epoch(0)))
    terms = distiller.train_step(images, labels)
    assert {"soft", "ce", "loss", "acc"} == set(terms)
    assert torch.allclose(terms["loss"], terms["soft"] + 0.5 * terms["ce"])


def test_python_function_runs_and_resumes(xml_run, synthetic_archive, tmp_path) -> None:
    xml, cache = xml_run
    out = tmp_path / "fn"
    options = dict(data=str(synthetic_archive), image_size=32, cache_dir=str(cache), subset=20, eval_subset=20)
    first = xross.distill(
        student=f"{xml}@0-0", teacher=[str(xml)], batch_size=10, epochs=1, out=str(out), progress=False, **options
    )
    assert [r.role for r in first.paths] == ["student", "teacher", "teacher"]
    assert final_state(out)["position"]["global_step"] == 2
    xross.distill(resume=True, out=str(out), epochs=2, progress=False)
    assert final_state(out)["position"]["global_step"] == 4
    with pytest.raises(XrossError, match="drop --lr"):
        xross.distill(resume=True, out=str(out), lr=0.1)
