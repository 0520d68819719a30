"""xross.run.checkpoint: digests catch altered tensors wherever a checkpoint is read; killed writes leave nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xross.errors import XrossError
from xross.run.checkpoint import CheckpointDir, read_checkpoint, state_digest

ROOT = Path(__file__).resolve().parents[1]


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run of two small VGGs (two checkpoints kept)."""
    from surgery.cli.kit import run_app
    from xross.cli.main import app

    tmp = tmp_path_factory.mktemp("ckpt")
    run = tmp / "run"
    args = [
        "train",
        "--nets",
        "growth.models:small_vgg,growth.models:small_vgg",
        "--cut",
        "features.0",
        "--mode",
        "dml",
        "--data",
        str(_image_folder(tmp / "data")),
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--cache-dir",
        str(tmp / "cache"),
        "--out",
        str(run),
        "--no-progress",
    ]
    with pytest.raises(SystemExit) as e:
        run_app(app, args)
    assert e.value.code == 0
    assert len(CheckpointDir(run).files()) == 2
    return run


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))


def test_digest_covers_every_value() -> None:
    state = {"cohort": {"w": torch.ones(4)}, "position": {"epoch": 1}, "rng": [torch.zeros(2, dtype=torch.uint8)]}
    same = {"position": {"epoch": 1}, "cohort": {"w": torch.ones(4)}, "rng": [torch.zeros(2, dtype=torch.uint8)]}
    assert state_digest(state) == state_digest(same)  # key order does not matter
    for changed in (
        {**state, "position": {"epoch": 2}},
        {**state, "cohort": {"w": torch.ones(4, dtype=torch.float64)}},
        {**state, "cohort": {"w": torch.ones(2, 2)}},
        {**state, "cohort": {"w": torch.tensor([1.0, 1, 1, 1.5])}},
    ):
        assert state_digest(changed) != state_digest(state)


def test_flipped_tensor_byte_is_caught_and_skipped(tmp_path: Path) -> None:
    store = CheckpointDir(tmp_path)
    store.save({"cohort": {"w": torch.arange(1000.0)}}, 1)
    newest = store.save({"cohort": {"w": torch.arange(1000.0) * 2}}, 2)
    _flip_tensor_byte(newest)
    with pytest.raises(XrossError, match="does not match its digest"):
        read_checkpoint(newest)
    altered = read_checkpoint(newest, verify=False)["cohort"]["w"]
    assert not torch.equal(altered, torch.arange(1000.0) * 2)  # the flip did change the weights
    with pytest.warns(UserWarning, match=f"{newest.name} does not match its digest.*loaded the previous one"):
        path, state = store.load_latest()
    assert path.name == "step-000000001.pt" and torch.equal(state["cohort"]["w"], torch.arange(1000.0))


def _damaged_copy(run: Path, to: Path, keep_previous: bool) -> Path:
    """A copy of ``run`` whose newest checkpoint has a flipped tensor byte (and, unless asked, no previous one)."""
    subprocess.run(["cp", "-r", str(run), str(to)], check=True)
    files = CheckpointDir(to).files()
    _flip_tensor_byte(files[-1])
    if not keep_previous:
        files[0].unlink()
    return files[-1]


@pytest.mark.parametrize("command", ["eval", "export", "resume"])
def test_every_reader_verifies(cli, tiny_run: Path, tmp_path: Path, command: str) -> None:
    def args(run: Path, out: Path) -> list:
        return {
            "eval": ["xross", "eval", run],
            "export": ["xross", "export", run, "--path", "0,1", "--out", out],
            "resume": ["xross", "train", "--resume", "--out", run, "--epochs", "3", "--no-progress"],
        }[command]

    damaged = _damaged_copy(tiny_run, tmp_path / "a", keep_previous=True)
    r = cli(*args(tmp_path / "a", tmp_path / "xa"))
    assert r.code == 0, r
    assert f"warning: checkpoint {damaged} does not match its digest" in " ".join(r.err.split()), r.err

    _damaged_copy(tiny_run, tmp_path / "b", keep_previous=False)
    r = cli(*args(tmp_path / "b", tmp_path / "xb"))
    assert r.code == 2 and "every checkpoint" in r.err and "does not match its digest" in r.err, r
    assert len(r.err.strip().splitlines()) == 1, r.err
    r = cli(*args(tmp_path / "b", tmp_path / "xb"), "--no-verify")
    assert r.code == 0, r


def test_killed_write_leaves_a_temporary_file_that_the_next_run_removes(cli, tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(tiny_run), str(run)], check=True)
    target = run / "checkpoints" / "step-000000099.pt"
    code = (
        "import os, pathlib, sys\n"
        "from surgery.core.util import atomic_write\n"
        "def partial(tmp):\n"
        "    tmp.write_bytes(b'half a checkpoint')\n"
        "    os.kill(os.getpid(), 9)\n"
        f"atomic_write(pathlib.Path({str(target)!r}), partial)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -9
    leftovers = [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and not target.exists()
    r = cli("xross", "train", "--resume", "--out", run, "--epochs", "3", "--no-progress")
    assert r.code == 0, r
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
