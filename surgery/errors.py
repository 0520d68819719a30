"""User-facing errors: one line that names the problem and the fix."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class SurgeryError(ValueError):
    """Bad input to the library. The message is one line: what is wrong and what to do.

    The command-line tools print it (no traceback) and exit with status 2.
    """


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates that look most like ``name`` (fuzzy match, then substring match)."""
    pool = list(dict.fromkeys(candidates))
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if len(found) < n:
        low = name.lower()
        found += [c for c in pool if low in c.lower() and c not in found][: n - len(found)]
    return found


def did_you_mean(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """``"closest: a, b, c"`` or a hint to list them, for the end of an error message."""
    found = closest(name, candidates, n)
    return f"closest: {', '.join(found)}" if found else "none is close"
