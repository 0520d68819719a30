"""surgery.core.trust: no name read from a file runs code outside the trusted packages unless the user says so.

Every route by which a file can name code is tried with a name that would leave a
marker file behind if it were imported or called; the marker must not appear, and the
refusal must be one line that names --trust-code. With --trust-code the same file does
leave the marker (so the marker would catch a regression).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import surgery
from surgery.core.errors import SurgeryError
from surgery.core.trust import Kind, in_trusted_package, resolve
from xross.run.checkpoint import CheckpointDir
from xross.run.config import DistillConfig, TrainConfig
from xross.run.directory import build_cohort

SMALL = {
    "source": "growth.models:small_vgg",
    "kwargs": {"widths": [4, 8], "num_classes": 3, "image_size": 8},
    "transforms": [],
}


@pytest.fixture
def evil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Packages `evilpkg` and `torchrelevil` on sys.path that touch MARKER when imported; the marker's path."""
    marker = tmp_path / "MARKER"
    site = tmp_path / "site"
    for name in ("evilpkg", "torchrelevil"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(
            textwrap.dedent(
                f"""
                import pathlib, torch
                pathlib.Path({str(marker)!r}).touch()

                class Leaf(torch.nn.Module):
                    def forward(self, x):
                        return x

                def build(**kwargs):
                    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
                """
            )
        )
    monkeypatch.syspath_prepend(str(site))
    for name in ("evilpkg", "torchrelevil"):
        sys.modules.pop(name, None)
    yield marker
    for name in ("evilpkg", "torchrelevil"):
        sys.modules.pop(name, None)


def _saved_pieces(tmp_path: Path) -> Path:
    net = surgery.models.build.rebuild(surgery.Recipe.model_validate(SMALL))
    return surgery.save(surgery.cut(net.eval(), "features.0", torch.randn(1, 3, 8, 8)), tmp_path / "pieces")


def _edit_recipe(directory: Path, edit) -> None:
    path = directory / "recipe.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _one_line_refusal(r, marker: Path) -> None:
    assert r.code == 2, r
    assert ("--trust-code" in r.err or "has no attribute" in r.err) and len(r.err.strip().splitlines()) == 1, r.err
    assert not marker.exists()


# --- the resolver itself ---------------------------------------------------------------------------


def test_whole_package_names_are_compared() -> None:
    assert in_trusted_package("torch.nn") and in_trusted_package("torch")
    assert not in_trusted_package("torchrelevil") and not in_trusted_package("surgeryx.mod")


@pytest.mark.parametrize(
    ("spec", "kind", "message"),
    [
        ("surgery.files.io:os.system", Kind.MODEL_SOURCE, "reaches 'os'"),
        ("surgery.core.trust:importlib.import_module", Kind.MODEL_SOURCE, "reaches 'importlib'"),
        ("surgery.core.recipe:importlib.import_module", Kind.MODEL_SOURCE, "has no attribute 'importlib'"),
        ("surgery.core.util:shutil.copyfile", Kind.MODEL_SOURCE, "reaches 'shutil'"),
        ("torch.hub:load", Kind.MODEL_SOURCE, "not an nn.Module class or a known model builder"),
        ("torch.nn.functional:relu", Kind.MODULE_CLASS, "not an nn.Module class"),
        ("torchvision.models:resnet18", Kind.MODULE_CLASS, "not an nn.Module class"),
        ("builtins:eval", Kind.MODEL_SOURCE, "imports 'builtins'"),
        ("os:system", Kind.MODEL_SOURCE, "imports 'os'"),
        ("not a name", Kind.MODEL_SOURCE, "is not of the form"),
    ],
)
def test_refusals_are_one_line_before_any_call(spec: str, kind: Kind, message: str) -> None:
    with pytest.raises(SurgeryError, match=message) as e:
        resolve(spec, kind=kind, what="the name")
    assert "\n" not in str(e.value)


def test_allowed_kinds_resolve() -> None:
    import torchvision

    assert resolve("torch.nn:Conv2d") is torch.nn.Conv2d
    assert resolve("torchvision.models:resnet18", kind=Kind.MODEL_SOURCE) is torchvision.models.resnet18
    assert resolve("growth.models:small_vgg", kind=Kind.MODEL_SOURCE).__name__ == "small_vgg"
    assert (
        resolve("surgery.files.io:os.system", trust_code=True) is __import__("os").system
    )  # trusted: anything callable


def test_builders_cannot_download() -> None:
    with pytest.raises(SurgeryError, match="'weights' would download weights"):
        surgery.models.build.rebuild(
            surgery.Recipe(source="torchvision.models:resnet18", kwargs={"weights": "IMAGENET1K_V1"})
        )
    with pytest.raises(SurgeryError, match="'pretrained' would download weights"):
        surgery.build_model("resnet18", pretrained=True)


# --- every route from a file to code --------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "kwargs"),
    [
        ("surgery.files.io:os.system", {"command": "touch {marker}"}),
        ("surgery.core.recipe:importlib.import_module", {"name": "evilpkg"}),
        ("surgery.core.trust:importlib.import_module", {"name": "evilpkg"}),
        ("surgery.files.io:shutil.copyfile", {"src": "{recipe}", "dst": "{marker}"}),
        ("surgery.core.util:shutil.copyfile", {"src": "{recipe}", "dst": "{marker}"}),
        ("evilpkg:build", {}),
    ],
)
def test_model_sources_in_recipes(cli, tmp_path: Path, evil: Path, source: str, kwargs: dict) -> None:
    d = _saved_pieces(tmp_path)
    filled = {k: v.format(marker=evil, recipe=d / "recipe.json") for k, v in kwargs.items()}

    def edit(data: dict) -> None:
        for piece in data["pieces"]:
            piece["origin"]["model"] = {"source": source, "kwargs": filled, "transforms": []}

    _edit_recipe(d, edit)
    for args in (
        ["surgery", "show", d, "--out", tmp_path / "g.dot"],
        ["surgery", "stitch", f"{d}:0", f"{d}:1", "--out", tmp_path / "h"],
        ["growth", "sites", d, "--op", "net2wider"],
        ["surgery", "nodes", d],
    ):
        _one_line_refusal(cli(*args), evil)
    with pytest.raises(SurgeryError, match="trust_code=True|has no attribute"):
        surgery.load(d)
    assert not evil.exists()


def test_trusting_the_file_does_run_it(tmp_path: Path, evil: Path) -> None:
    d = _saved_pieces(tmp_path)
    _edit_recipe(d, lambda data: data["pieces"][0]["origin"]["model"].update(source="evilpkg:build", kwargs={}))
    with pytest.raises(SurgeryError):  # runs the code (then the weights do not fit)
        surgery.load(d, trust_code=True)
    assert evil.exists()


def test_leaf_module_classes(cli, tmp_path: Path, evil: Path) -> None:
    d = _saved_pieces(tmp_path)
    _edit_recipe(d, lambda data: [p["origin"].update(leaf_modules=["torchrelevil:Leaf"]) for p in data["pieces"]])
    _one_line_refusal(cli("surgery", "show", d, "--out", tmp_path / "g.dot"), evil)


@pytest.mark.parametrize(
    "cls", ["surgery.files.io:os.system", "torch.nn:os.system", "evilpkg:Leaf", "torchrelevil:Leaf"]
)
def test_module_specs_of_adapters_and_replacements(cli, tmp_path: Path, evil: Path, cls: str) -> None:
    a = surgery.cut(surgery.build_model("resnet18", num_classes=10).eval(), "layer2", torch.randn(1, 3, 32, 32))
    b = surgery.cut(surgery.build_model("resnet50", num_classes=10).eval(), "layer2", torch.randn(1, 3, 32, 32))
    d = surgery.save(surgery.stitch(a[0], b[1], torch.randn(1, 3, 32, 32)), tmp_path / "hybrid")
    _edit_recipe(
        d, lambda data: data["pieces"][1]["spec"].update({"class": cls, "kwargs": {"command": f"touch {evil}"}})
    )
    _one_line_refusal(cli("surgery", "show", d, "--out", tmp_path / "g.dot"), evil)
    # the same class inside a recorded `replace` transform
    model_dir = surgery.save(
        surgery.replace(surgery.build_model("resnet18"), "fc", torch.nn.Linear(512, 4)), tmp_path / "m"
    )
    _edit_recipe(model_dir, lambda data: data["model"]["transforms"][0]["args"]["module"].update({"class": cls}))
    _one_line_refusal(cli("surgery", "show", model_dir, "--out", tmp_path / "g.dot"), evil)


def _run_dir(tmp_path: Path, nets: list[str]) -> Path:
    """A run directory as `xross train` leaves it (config + one checkpoint), naming ``nets``."""
    run = tmp_path / "run"
    cfg = TrainConfig(
        nets=["growth.models:small_vgg"] * 2,
        cuts=["features.0"],
        num_classes=10,
        image_size=32,
        out=str(run),
        data="cifar10",
    )
    cohort = build_cohort(cfg, torch.device("cpu"))
    CheckpointDir(run).save({"cohort": cohort.state_dict(), "position": {"epoch": 1, "step": 0, "global_step": 1}}, 1)
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg.model_dump(), "nets": nets}))
    return run


def test_nets_of_run_directories(cli, tmp_path: Path, evil: Path) -> None:
    run = _run_dir(tmp_path, ["evilpkg:build", "growth.models:small_vgg"])
    _one_line_refusal(cli("xross", "eval", run), evil)
    _one_line_refusal(cli("xross", "export", run, "--path", "0,1", "--out", tmp_path / "x"), evil)
    _one_line_refusal(cli("xross", "train", "--resume", "--out", run, "--no-progress"), evil)
    _one_line_refusal(
        cli("xross", "train", "--config", run / "config.yaml", "--out", tmp_path / "r2", "--no-progress"), evil
    )


def test_kd_teachers_are_files_from_elsewhere(cli, tmp_path: Path, evil: Path) -> None:
    teacher = _saved_pieces(tmp_path)
    _edit_recipe(teacher, lambda data: [p["origin"]["model"].update(source="evilpkg:build") for p in data["pieces"]])
    r = cli(
        "xross",
        "train",
        "--nets",
        "growth.models:small_vgg,growth.models:small_vgg",
        "--cut",
        "features.0",
        "--mode",
        "kd",
        "--teacher",
        teacher,
        "--data",
        tmp_path / "no-data",
        "--out",
        tmp_path / "run",
        "--no-progress",
    )
    assert r.code == 2 and not evil.exists(), r


def test_students_and_teachers_of_distillation_runs(cli, tmp_path: Path, evil: Path) -> None:
    run = tmp_path / "distill"
    run.mkdir()
    cfg = DistillConfig(student="evilpkg:build", teacher=[str(_saved_pieces(tmp_path))], data="cifar10", out=str(run))
    cfg.save(run / "config.yaml")
    _one_line_refusal(cli("xross", "distill", "--resume", "--out", run, "--no-progress"), evil)
    _one_line_refusal(cli("xross", "distill", "--config", run / "config.yaml", "--out", tmp_path / "d2"), evil)
    teacher = _saved_pieces(tmp_path / "t")
    _edit_recipe(teacher, lambda data: [p["origin"]["model"].update(source="evilpkg:build") for p in data["pieces"]])
    r = cli("xross", "distill", "--student", "resnet18", "--teacher", teacher, "--out", tmp_path / "d3")
    _one_line_refusal(r, evil)
    assert not (tmp_path / "d3").exists()
