"""Atomic, pickle-free checkpoints of a training run.

A checkpoint is written to a temporary file, flushed and fsynced, then renamed over
its final name (and the directory fsynced), so a crash mid-write never corrupts the
last good one. Files are read with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers only. The newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from surgery._util import atomic_write, first_line
from xross.errors import XrossError

_NAME = re.compile(r"^step-(\d{9})\.pt$")


def write_atomically(path: Path, state: dict[str, Any]) -> None:
    """``torch.save(state, path)`` via temp file + fsync + rename."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file safely; a truncated or corrupt file gives a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise XrossError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise XrossError(f"checkpoint {path} is truncated or corrupt ({first_line(e, 160)}); an older checkpoint may still load") from None
    if not isinstance(state, dict) or "cohort" not in state:
        raise XrossError(f"checkpoint {path} is not an xross checkpoint")
    return state


class CheckpointDir:
    """``run/checkpoints/step-000000123.pt`` files, newest last."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.dir = run_dir / "checkpoints"
        self.keep = max(keep, 1)

    def files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if _NAME.match(p.name))

    def save(self, state: dict[str, Any], global_step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{global_step:09d}.pt"
        write_atomically(path, state)
        for old in self.files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        files = self.files()
        return files[-1] if files else None

    def load_latest(self) -> tuple[Path, dict[str, Any]]:
        """The newest checkpoint that loads; a damaged newer one is reported and skipped."""
        files = self.files()
        if not files:
            raise XrossError(f"no checkpoint in {self.dir}; start the run without --resume")
        for path in reversed(files):
            try:
                return path, read_checkpoint(path)
            except XrossError as e:
                warnings.warn(f"{e}; trying the previous one", stacklevel=2)
        raise XrossError(f"every checkpoint in {self.dir} is damaged; start again without --resume (use --force)")
