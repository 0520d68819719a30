"""Helpers shared by several test modules (the shared fixtures are in conftest.py).

Growth (test_wider.py, test_growth.py): ``X``, an input batch, and :func:`same_output`.
Cohorts (conftest.py's ``cohort``, test_cohort.py): :func:`tiny`, a small VGG.
Runs of the ``xross`` CLI in a subprocess (test_trainer.py, test_distributed.py): :func:`xross`,
:func:`finish`, and :func:`final_state` / :func:`assert_same_tensors` to compare their last checkpoints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import surgery
from xross.run.checkpoint import CheckpointDir, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# --- growth ---------------------------------------------------------------------------------------

X = torch.randn(2, 3, 64, 64)


def same_output(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``b`` computes what ``a`` computes on ``x`` (both in eval mode), to ``1e-4 * max |a(x)|``."""
    with torch.no_grad():
        y = a.eval()(x)
        return bool((b.eval()(x) - y).abs().max() <= 1e-4 * y.abs().max())


# --- cohorts --------------------------------------------------------------------------------------


def tiny(widths: list[int]) -> torch.nn.Module:
    """A small VGG (``growth.models:small_vgg``) with these stage widths, for 10 classes of 16x16 images."""
    return surgery.build_model("growth.models:small_vgg", widths=widths, num_classes=10, image_size=16)


# --- xross runs in a subprocess -------------------------------------------------------------------


def xross(*args: str, **kw) -> subprocess.Popen:
    """Start ``python -m xross ARGS`` in the repository, one thread, unbuffered output."""
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
    """Wait for a process started by :func:`xross`: ``(exit status, stdout, stderr)``."""
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def interrupt_after_steps(p: subprocess.Popen, run: Path, steps: int = 3, timeout: float = 240) -> tuple[int, str, str]:
    """Send SIGINT to a running ``xross train|distill`` once ``run/steps.csv`` has ``steps`` rows; then finish it."""
    csv = run / "steps.csv"
    deadline = time.time() + timeout
    while p.poll() is None and time.time() < deadline:
        if csv.exists() and len(csv.read_text().splitlines()) - 1 >= steps:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    return finish(p)


def final_state(run: Path) -> dict:
    """The latest checkpoint of a run directory."""
    return read_checkpoint(CheckpointDir(run).latest())


def assert_same_tensors(a: dict, b: dict) -> None:
    """Two state dicts (or checkpoints' ``cohort``) hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def cli_app(tool: str) -> Any:
    """The typer app of a command-line tool, found from its installed console script (``surgery``, ``growth``...)."""
    import importlib
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name=tool)
    return importlib.import_module(script.module).app
