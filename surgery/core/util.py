"""Small jobs every package repeats, written once: mode restoring, one-line messages, atomic writes.

>>> import torch
>>> net = torch.nn.Linear(2, 2).train()
>>> with evaluating(net):
...     net.training
False
>>> net.training
True
>>> first_line(RuntimeError("shape mismatch\\n  at layer 3")), first_line(KeyError())
('shape mismatch', 'KeyError')
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

TMP_MARK = ".tmp-"  # every temporary file or directory of an atomic write has this in its name


@contextlib.contextmanager
def evaluating(*models: nn.Module, grad: bool = False) -> Iterator[None]:
    """Eval mode (and no autograd unless ``grad``) for the duration; each model's own mode comes back afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with contextlib.nullcontext() if grad else torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def max_difference(a: Any, b: Any) -> float:
    """max |a - b| over the tensors of two outputs of one structure (a ModelOutput, a tuple...); inf if they differ."""
    from torch.utils import _pytree as pytree

    xs = [t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    ys = [t for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        return float("inf")
    return max((float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(xs, ys)), default=0.0)


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its class name when the message is empty)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never half of one;
    the temporary file (named ``.<name>.tmp-<pid>-...``) is removed on failure, and
    :func:`remove_leftovers` removes those a killed process left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}{os.getpid()}-")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_directory(target: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp_dir)``, then put the finished directory at ``target`` (an old ``target`` goes only after).

    A failure leaves ``target`` as it was and removes the temporary directory.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}{os.getpid()}-", dir=target.parent))
    try:
        fill(tmp)
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}{TMP_MARK}old-{os.getpid()}")
            target.rename(backup)
        tmp.rename(target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    return target


def remove_leftovers(directory: str | os.PathLike[str], name: str = "") -> list[Path]:
    """Remove what interrupted atomic writes of ``name`` (default: any) left in ``directory``; the paths removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        if p.name.startswith(f".{name}") and TMP_MARK in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
