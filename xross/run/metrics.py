"""Metrics to CSV files in the run directory (and TensorBoard when it is installed)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from surgery.core.util import atomic_write_text


class MetricsLog:
    """Appends rows to ``<name>.csv``; the header is the keys of the rows written, in order of first appearance
    (a row with a new key, e.g. the first evaluated epoch after ``eval_every`` skipped some, widens the file;
    a row without a key leaves its cell empty).

    On resume the existing files are cut back to the checkpoint's global step, so a
    resumed run's CSVs equal an uninterrupted run's.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.run_dir = run_dir
        self.writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def _path(self, name: str) -> Path:
        return self.run_dir / f"{name}.csv"

    def write(self, name: str, row: dict[str, Any], step: int) -> None:
        path = self._path(name)
        header = _header(path)
        if header is not None and not set(row) <= set(header):
            _widen(path, [*header, *(k for k in row if k not in header)])
            header = _header(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header or list(row), restval="")
            if header is None:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{name}/{k}", v, step)

    def truncate(self, name: str, key: str, upto: int) -> None:
        """Drop rows whose ``key`` column exceeds ``upto`` (rows written after a checkpoint)."""
        path = self._path(name)
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        col = rows[0].index(key)
        kept = [rows[0]] + [r for r in rows[1:] if int(float(r[col])) <= upto]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _header(path: Path) -> list[str] | None:
    """The column names of a CSV file; None when it does not exist or is empty."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def _widen(path: Path, header: list[str]) -> None:
    """Rewrite a CSV file under a wider ``header`` (the new columns empty in the rows already there)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=header, restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, text.getvalue())


def read_metrics(run_dir: Path, name: str) -> list[dict[str, float]]:
    """The rows of ``<name>.csv`` as numbers (empty cells dropped); [] when the file does not exist."""
    path = run_dir / f"{name}.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        values = {}
        for k, v in row.items():
            try:
                values[k] = float(v)
            except (TypeError, ValueError):
                continue
        out.append(values)
    return out
