"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator
from typing import Any

from surgery.core.util import first_line


class UserError(ValueError):
    """Bad input to the library: the base of every error users are meant to catch.

    The message is one line: what is wrong and what to do. The command-line tools
    print it (no traceback) and exit with ``exit_code`` (2).
    :class:`SurgeryError`, :class:`growth.errors.GrowthError` and
    :class:`xross.errors.XrossError` derive from it, one per package.
    """

    exit_code = 2


class SurgeryError(UserError):
    """Bad input to :mod:`surgery` (tracing, cutting, stitching, files)."""


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


def _describe_inputs(inputs: Any) -> str:
    shapes = [tuple(getattr(x, "shape", ())) for x in (inputs if isinstance(inputs, (tuple, list)) else (inputs,))]
    return ", ".join(str(s) for s in shapes)


@contextlib.contextmanager
def running_on(inputs: Any, what: str = "the model") -> Iterator[None]:
    """Turn an error raised while running ``what`` on ``inputs`` into a one-line :class:`SurgeryError`."""
    try:
        yield
    except UserError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as e:
        raise SurgeryError(
            f"{what} failed on an input of shape {_describe_inputs(inputs)}: {first_line(e)}; "
            "pass an input the model accepts (CLI: --input)"
        ) from None
