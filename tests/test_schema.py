"""surgery.schema and the readers built on it: any damaged file loads cleanly or fails in one line, never a traceback.

For each file the library reads (recipe.json, a run's config.yaml and eval.json, growth
logs, checkpoints), hypothesis (fixed seed) writes at least 200 distinct mutated
versions: fields of the wrong type, nulls, missing and extra keys, flipped bytes,
truncations. Each is read through the command that reads it in practice; the command
must finish with status 0, or with status 2 and one line on stderr. A checkpoint must
never load with altered weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import cli_app
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

import growth
import surgery
from surgery.cli.kit import run_app
from surgery.core.errors import UserError
from xross.run.checkpoint import CheckpointDir
from xross.run.config import TrainConfig
from xross.run.directory import build_cohort

MUTANTS = 200  # distinct mutated files per file type, at least
EXAMPLES = 240  # hypothesis examples drawn to get them (a few draws repeat)
VALUES = [
    None,
    0,
    -1,
    1,
    3,
    2.5,
    -0.5,
    "",
    "x",
    "1e-4",
    "resnet18",
    True,
    False,
    [],
    {},
    ["a"],
    [1, 2],
    {"k": 1},
    10**6,
]

SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


# --- mutations ----------------------------------------------------------------------------------------


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON-like document."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _mutate_tree(doc: Any, path: tuple, action: str, value: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "extra" and isinstance(parent, dict):
        parent[f"unexpected_{key}"] = value
    elif action == "wrap":
        parent[key] = [parent[key]]
    else:
        parent[key] = value
    return doc


@st.composite
def mutated(draw: st.DrawFn, doc: Any, dump: Any) -> bytes:
    """A damaged serialisation of ``doc``: a structural change, then (sometimes) damaged bytes."""
    if draw(st.integers(0, 3)) > 0:
        path = draw(st.sampled_from(_paths(doc)))
        action = draw(st.sampled_from(["replace", "replace", "delete", "extra", "wrap"]))
        doc = _mutate_tree(doc, path, action, draw(st.sampled_from(VALUES)))
    blob = bytearray(dump(doc).encode())
    damage = draw(st.sampled_from(["none", "none", "flip", "truncate"]))
    if damage == "flip" and blob:
        i = draw(st.integers(0, len(blob) - 1))
        blob[i] ^= draw(st.integers(1, 255))
    elif damage == "truncate":
        blob = blob[: draw(st.integers(0, max(len(blob) - 1, 0)))]
    return bytes(blob)


def _run(tool: str, *args: Any) -> tuple[int, str]:
    """Run a CLI in-process: (exit status, stderr). Anything but a clean exit 0/2 fails the test with its traceback."""
    app = cli_app(tool)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_app(app, [str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return code, err.getvalue()


def _clean(code: int, err: str) -> None:
    """Exit 0, or 2 with one ``error:`` line; warnings about what else the file held may come before it."""
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert lines and not [line for line in lines[:-1] if not line.startswith("warning: ")], err
        assert "Traceback" not in err and not lines[-1].startswith("warning: "), err


def _check_property(tmp_path: Path, original: Any, dump: Any, write_and_run: Any) -> dict[int, int]:
    """Run the mutants; return how many distinct files ended with each exit status (printed with -s)."""
    outcome: dict[bytes, int] = {}

    @SETTINGS
    @seed(18)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        blob = data.draw(mutated(original, dump))
        code, err = write_and_run(blob)
        _clean(code, err)
        outcome[blob] = code

    run()
    assert len(outcome) >= MUTANTS
    counts = {code: list(outcome.values()).count(code) for code in sorted(set(outcome.values()))}
    print(f"{len(outcome)} distinct mutated files, exit statuses {counts}")
    return counts


# --- the files -----------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # a mutated path must not land in the repository
    return tmp_path


def _tiny(widths: list[int]) -> torch.nn.Module:
    return surgery.build_model("growth.models:small_vgg", widths=widths, num_classes=3, image_size=8).eval()


def test_mutated_recipes(in_tmp: Path) -> None:
    x = torch.randn(1, 3, 8, 8)
    a, b = surgery.cut(_tiny([4, 8]), "features.0", x), surgery.cut(_tiny([6, 8]), "features.0", x)
    saved = surgery.save(surgery.stitch(a[0], b[1], x), in_tmp / "hybrid")  # two origins and an adapter
    original = json.loads((saved / "recipe.json").read_text())

    def write_and_run(blob: bytes) -> tuple[int, str]:
        (saved / "recipe.json").write_bytes(blob)
        return _run("surgery", "show", saved, "--out", in_tmp / "graph.dot")

    _check_property(in_tmp, original, lambda d: json.dumps(d, indent=1), write_and_run)


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")
    return root


def test_mutated_run_configs(in_tmp: Path) -> None:
    run = in_tmp / "run"
    cfg = TrainConfig(
        nets=["growth.models:small_vgg"] * 2,
        cuts=["features.0"],
        num_classes=2,
        image_size=32,
        out=str(run),
        data=str(_image_folder(in_tmp / "data")),
        cache_dir=str(in_tmp / "cache"),
        eval_subset=4,
    )
    cohort = build_cohort(cfg.model_copy(update={"nets": ["growth.models:small_vgg"] * 2}), torch.device("cpu"))
    CheckpointDir(run).save({"cohort": cohort.state_dict()}, 1)
    original = cfg.model_dump(mode="json")
    original["nets"] = ["growth.models:small_vgg", "growth.models:small_vgg"]

    def write_and_run(blob: bytes) -> tuple[int, str]:
        (run / "config.yaml").write_bytes(blob)
        result = _run("xross", "eval", run)
        _clean(*result)
        return (
            _run("xross", "train", "--resume", "--out", run, "--epochs", "1", "--no-progress")
            if result[0] == 2
            else result
        )

    _check_property(in_tmp, original, lambda d: yaml.safe_dump(d, sort_keys=False), write_and_run)


def test_mutated_evaluations(in_tmp: Path) -> None:
    run = in_tmp / "run"
    run.mkdir()
    rows = [
        {"path": [i, j], "name": f"{i}>{j}", "top1": 60.0 + i, "top5": 90.0, "params": 1000 * (i + j + 1), "flops": 2e6}
        for i in range(2)
        for j in range(2)
    ]
    original = {"format_version": 1, "paths": rows, "ensembles": {"nets": {"top1": 70.0, "top5": 91.0}}, "samples": 100}

    def write_and_run(blob: bytes) -> tuple[int, str]:
        (run / "eval.json").write_bytes(blob)
        return _run("xross", "best", run, "--max-params", "3k")

    _check_property(in_tmp, original, lambda d: json.dumps(d, indent=1), write_and_run)


def test_mutated_growth_logs(in_tmp: Path) -> None:
    model = surgery.save(_tiny([4, 8]), in_tmp / "model")
    _, records = growth.mutate(
        _tiny([4, 8]), steps=2, seed=0, ops=["net2wider", "net2deeper"], example_input=torch.randn(2, 3, 8, 8)
    )
    original = [r.to_json() for r in records]

    def write_and_run(blob: bytes) -> tuple[int, str]:
        (in_tmp / "log.jsonl").write_bytes(blob)
        return _run("growth", "replay", model, in_tmp / "log.jsonl")

    _check_property(
        in_tmp,
        original,
        lambda d: "\n".join(json.dumps(r) for r in d) if isinstance(d, list) else json.dumps(d),
        write_and_run,
    )


def test_damaged_checkpoints_never_load_altered(tmp_path: Path) -> None:
    """Flipped bytes and truncations of the newest checkpoint: the previous one loads, or the newest loads unaltered."""
    run = tmp_path / "run"
    store = CheckpointDir(run, keep=2)
    good = {"cohort": {"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(3)}, "position": {"epoch": 1}}
    newest = {"cohort": {"w": torch.arange(64, dtype=torch.float32) * 2, "b": torch.zeros(3)}, "position": {"epoch": 2}}
    store.save(good, 1)
    path = store.save(newest, 2)
    blob = path.read_bytes()
    seen: set[tuple[int, int, str]] = set()

    @SETTINGS
    @seed(18)
    @given(st.integers(0, len(blob) - 1), st.integers(1, 255), st.sampled_from(["flip", "flip", "truncate"]))
    def run_one(i: int, xor: int, damage: str) -> None:
        seen.add((i, xor if damage == "flip" else 0, damage))
        damaged = bytearray(blob)
        if damage == "flip":
            damaged[i] ^= xor
        else:
            damaged = damaged[:i]
        path.write_bytes(bytes(damaged))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warns, naming the damaged file
            try:
                _, state = store.load_latest()
            except UserError as e:
                assert "\n" not in str(e)
                return
        expected = newest if state["position"]["epoch"] == 2 else good
        assert all(torch.equal(state["cohort"][k], expected["cohort"][k]) for k in expected["cohort"])

    run_one()
    path.write_bytes(blob)
    assert len(seen) >= MUTANTS and os.path.getsize(path) == len(blob)
