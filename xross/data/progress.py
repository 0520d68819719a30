"""A transient progress bar for the slow steps of loading a split (reading an archive, decoding images)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import Progress, TaskID

__all__ = ["PROGRESS_DELAY", "DelayedProgress"]

PROGRESS_DELAY = 0.5  # seconds a job runs before its progress bar appears


class DelayedProgress:
    """A transient rich progress bar (on stderr) that appears once its job has run for a while.

    >>> with DelayedProgress("counting", 3, enabled=False) as bar:
    ...     for done in range(1, 4):
    ...         bar.update(done)
    """

    def __init__(self, description: str, total: float, enabled: bool) -> None:
        self._description = description
        self._total = total
        self._enabled = enabled
        self._start = time.perf_counter()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def update(self, completed: float) -> None:
        """Report progress; the bar starts on the first update after :data:`PROGRESS_DELAY` seconds."""
        if self._bar is None:
            if not self._enabled or time.perf_counter() - self._start < PROGRESS_DELAY:
                return
            self._bar = Progress(*Progress.get_default_columns(), transient=True, console=Console(stderr=True))
            self._task = self._bar.add_task(self._description, total=self._total)
            self._bar.start()
        assert self._task is not None, "the task is added with the bar"
        self._bar.update(self._task, completed=completed)

    def __enter__(self) -> DelayedProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()
