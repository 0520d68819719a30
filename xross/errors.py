"""The errors :mod:`xross` raises: bad input, and the two ways a run stops early."""

from __future__ import annotations

from surgery.core.errors import UserError


class XrossError(UserError):
    """Bad input to training, evaluation or export (one line, exit 2 from the CLI)."""


class Interrupted(XrossError):
    """SIGINT/SIGTERM stopped the run after a checkpoint was written."""

    exit_code = 130


class TrainingDiverged(XrossError):
    """A loss term became NaN or infinite; nothing was saved after the last good checkpoint."""

    exit_code = 3
