"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from surgery.core.util import first_line


class UserError(ValueError):
    """Bad input to the library: the base of every error users are meant to catch.

    The message is one line: what is wrong and what to do. The command-line tools
    print it (no traceback) and exit with ``exit_code`` (2).
    :class:`SurgeryError`, :class:`growth.errors.GrowthError` and
    :class:`xross.errors.XrossError` derive from it, one per package.

    >>> import surgery, growth.errors, xross.errors
    >>> errors = (surgery.SurgeryError, growth.errors.GrowthError, xross.errors.XrossError)
    >>> all(issubclass(e, surgery.UserError) and e.exit_code == 2 for e in errors)
    True
    """

    exit_code = 2


class SurgeryError(UserError):
    """Bad input to :mod:`surgery` (tracing, cutting, stitching, files).

    >>> import torchvision, surgery
    >>> try:
    ...     surgery.cut(torchvision.models.resnet18(), "layer9")
    ... except surgery.SurgeryError as e:
    ...     print(type(e).__name__, str(e)[:37])
    SurgeryError 'layer9' is not a module path or node
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


def renamed_argument(
    function: str, new: str, value: Any, old: str, old_value: Any, error: type[UserError] = SurgeryError
) -> Any:
    """``value`` (argument ``new`` of ``function``), or ``old_value`` given under its former name ``old``.

    The former name still works for now, with a :class:`FutureWarning` naming the new one;
    both at once are refused in one line. Command-line options are named with their dashes
    (``renamed_argument("growth mutate", "--at", at, "--after", after)``).

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     renamed_argument("export", "example_input", None, "example", 3)
    3
    >>> str(seen[0].message)
    'export(example=...) is now export(example_input=...); the old name will be removed'
    """
    if old_value is None:
        return value
    option = old.startswith("--")
    who, new_name, old_name = (function, new, old) if option else (f"{function}()", f"{new}=", f"{old}=")
    if value is not None:
        raise error(f"{who} got both {new_name} and its former name {old_name}; give {new_name} only")
    said = f"{function} {old} is now {new}" if option else f"{function}({old}=...) is now {function}({new}=...)"
    warnings.warn(f"{said}; the old name will be removed", FutureWarning, stacklevel=3)
    return old_value
