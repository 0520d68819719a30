"""The one error :mod:`growth` raises for bad input (one line, exit 2 from the CLI)."""

from __future__ import annotations

from surgery.core.errors import UserError


class GrowthError(UserError):
    """A growth op that does not apply, a bad argument, a corrupt growth log."""
