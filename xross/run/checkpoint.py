"""Atomic, pickle-free, verified checkpoints of a training run.

A checkpoint is written to a temporary file, fsynced, then renamed over its final
name, so a crash mid-write never corrupts the last good one (a temporary file a
killed write left behind is removed when the run directory is opened again). Files
are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only. Every checkpoint records the SHA-256 of its content (every tensor's
bytes, dtype and shape and every other value, under its key path); loading recomputes
it, so a flipped byte in tensor data is caught, and :meth:`CheckpointDir.load_latest`
falls back to the previous good checkpoint with a warning naming the damaged file.
The newest ``keep`` checkpoints are kept.

>>> import tempfile, torch
>>> d = CheckpointDir(Path(tempfile.mkdtemp()))
>>> path = d.save({"cohort": {"w": torch.ones(3)}, "position": {"epoch": 1}}, global_step=7)
>>> path.name, d.load_latest()[1]["position"]
('step-000000007.pt', {'epoch': 1})
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from surgery.core.util import atomic_write, first_line, remove_leftovers
from xross.errors import XrossError

_NAME = re.compile(r"^step-(\d{9})\.pt$")
DIGEST_KEY = "digest"
MODEL_KEYS = ("cohort", "student", "slim")  # a cohort, a distillation's student, a mutualnet run's net


def state_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content: each leaf's key path, type, and bytes (tensors) or repr (the rest)."""
    h = hashlib.sha256()

    def visit(path: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=repr):
                visit(f"{path}/{key!r}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{path}/{i}", item)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{path}:tensor:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        else:
            h.update(f"{path}:{type(value).__name__}:{value!r}".encode())

    visit("", state)
    return h.hexdigest()


def write_atomically(path: Path, state: dict[str, Any]) -> None:
    """``torch.save(state + its digest, path)`` via temp file + fsync + rename."""
    atomic_write(path, lambda tmp: torch.save({**state, DIGEST_KEY: state_digest(state)}, tmp))


def read_checkpoint(path: Path, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint file safely; a truncated, corrupt or altered file gives a one-line error.

    ``verify=False`` skips the digest check (for weights edited on purpose).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise XrossError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise XrossError(
            f"checkpoint {path} is truncated or corrupt ({first_line(e, 160)}); an older checkpoint may still load"
        ) from None
    if not isinstance(state, dict) or not any(isinstance(state.get(k), dict) for k in MODEL_KEYS):
        raise XrossError(f"checkpoint {path} is not an xross checkpoint")
    recorded = state.pop(DIGEST_KEY, None)
    if verify:
        if not isinstance(recorded, str):
            raise XrossError(
                f"checkpoint {path} records no digest (written by an older version); pass --no-verify to load it anyway"
            )
        if state_digest(state) != recorded:
            raise XrossError(
                f"checkpoint {path} does not match its digest: its data was altered or damaged "
                "(pass --no-verify if you edited it on purpose)"
            )
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

    def remove_leftovers(self) -> list[Path]:
        """Remove temporary files of checkpoint writes that a killed process left behind."""
        return remove_leftovers(self.dir)

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

    def load_latest(self, verify: bool = True) -> tuple[Path, dict[str, Any]]:
        """The newest checkpoint that loads (and matches its digest); a damaged newer one is reported and skipped."""
        files = self.files()
        if not files:
            raise XrossError(f"no checkpoint in {self.dir}; start the run without --resume")
        failures: list[str] = []
        for path in reversed(files):
            try:
                state = read_checkpoint(path, verify)
            except XrossError as e:
                failures.append(str(e))
                continue
            for failure in failures:
                warnings.warn(f"{failure}; loaded the previous one, {path.name}", stacklevel=2)
            return path, state
        raise XrossError(f"every checkpoint in {self.dir} is damaged (the newest: {failures[0]})")
