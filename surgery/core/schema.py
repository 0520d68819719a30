"""Declared schemas for the files the library reads, and one-line errors when a file does not fit.

Every file format (``recipe.json``, a run's ``config.yaml`` and ``eval.json``, growth
logs, export manifests) is one :class:`FileModel` subclass: pydantic v2 models that
forbid unknown fields, do not coerce types (``"3"`` is not a number), carry a
``format_version``, and upgrade older versions through :meth:`FileModel.upgrade` before
validating. :func:`parse` turns the first validation error into one line that names the
file, the field, what was expected and what was found.

>>> class Point(FileModel):
...     format_version: int = 1
...     x: int
>>> parse(Point, {"x": 3}, "point.json").x
3
>>> parse(Point, {"x": "3"}, "point.json")
Traceback (most recent call last):
...
surgery.core.errors.SurgeryError: point.json: field 'x' should be a valid integer, found str '3'; fix or ...
>>> parse(Point, {"x": 3, "y": 4}, "point.json")
Traceback (most recent call last):
...
surgery.core.errors.SurgeryError: point.json: field 'y' is not a known field (known: format_version, x); fix or ...
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from surgery.core.errors import SurgeryError, UserError, did_you_mean
from surgery.core.util import first_line

M = TypeVar("M", bound="FileModel")
Upgrade = Callable[[dict[str, Any]], dict[str, Any]]

DEFAULT_FIX = "fix or replace the file"


class FileModel(BaseModel):
    """Base of every declared file schema: unknown fields are errors, types are not coerced.

    A subclass whose ``format_version`` has changed lists, in ``upgrades``, a function per
    older version that turns a file of that version into one of the next version.
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, populate_by_name=True)

    upgrades: ClassVar[dict[int, Upgrade]] = {}

    @classmethod
    def current_version(cls) -> int | None:
        field = cls.model_fields.get("format_version")
        return field.default if field is not None and isinstance(field.default, int) else None

    @classmethod
    def upgrade(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """Bring ``data`` of an older ``format_version`` up to the current one (a missing version counts as 1)."""
        current = cls.current_version()
        if current is None:
            return data
        version = data.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise SurgeryError(f"{where}: field 'format_version' should be an integer, found {describe_value(version)}")
        if version > current:
            raise SurgeryError(
                f"{where} has format_version {version}, newer than this installation reads ({current}); "
                "upgrade xross-surgery"
            )
        while version < current:
            step = cls.upgrades.get(version)
            if step is None:
                raise SurgeryError(f"{where} has format_version {version}, which this installation no longer reads")
            data = step(dict(data))
            version += 1
            data["format_version"] = version
        return data


def _float_from_text(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string: accept numeric text for floats (but not bools)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Float = Annotated[float, BeforeValidator(_float_from_text)]
"""A float field that also accepts numbers written as text (``lr: 1e-4`` in YAML)."""


def describe_value(value: Any) -> str:
    """``str '3'``, ``null``, ``list of 2``: what a field held, shortly."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at ``loc``, for 'did you mean'."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            break
        annotation = fields[part].annotation
        args = getattr(annotation, "__args__", ()) or (annotation,)
        current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(getattr(current, "model_fields", {})) if current is not None else []


def describe_error(error: ValidationError, model: type[BaseModel], where: str, fix: str = DEFAULT_FIX) -> str:
    """One line for the first error of ``error``."""
    first = error.errors(include_url=False)[0]
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    field = _location(loc)
    if kind == "missing":
        what = f"field '{field}' is missing"
    elif kind == "extra_forbidden":
        name = str(loc[-1]) if loc else field
        known = _known_fields(model, loc[:-1])
        hint = did_you_mean(name, known) if known else ""
        listing = f"known: {', '.join(known)}" if known and len(known) <= 8 else hint
        what = f"field '{field}' is not a known field" + (f" ({listing})" if listing else "")
    elif not loc:  # a check of the whole file
        what = str(first.get("msg", "is invalid")).replace("Value error, ", "")
    else:
        message = str(first.get("msg", "is invalid")).replace("Value error, ", "").replace(" after validation", "")
        message = re.sub(r"^(Input|List|String|Dictionary|Tuple|Value|Decimal) (should|must)", r"\2", message)
        what = f"field '{field}' {message[0].lower() + message[1:] if message else 'is invalid'}"
        what += f", found {describe_value(first.get('input'))}"
    return f"{where}: {what}; {fix}"


def parse(model: type[M], data: Any, where: str, fix: str = DEFAULT_FIX) -> M:
    """Validate ``data`` (parsed JSON/YAML) against ``model``, upgrading older versions first; one-line errors."""
    if not isinstance(data, dict):
        raise SurgeryError(
            f"{where}: expected an object of fields at the top level, found {describe_value(data)}; {fix}"
        )
    try:
        data = model.upgrade(data, where)
        return model.model_validate(data)
    except ValidationError as e:
        raise SurgeryError(describe_error(e, model, where, fix)) from None
    except UserError:
        raise
    except (ValueError, TypeError) as e:  # a validator of the model refusing a value
        raise SurgeryError(f"{where}: {e}; {fix}") from None


def read_json_file(path: Path, *, missing: str, fix: str) -> Any:
    """The JSON value in ``path``, or a one-line :class:`SurgeryError`: ``missing`` if there is no such file,
    otherwise what is wrong with it followed by ``fix``."""
    if not path.is_file():
        raise SurgeryError(missing)
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path} is not valid JSON ({first_line(e)}); {fix}") from None
    except OSError as e:
        raise SurgeryError(f"cannot read {path}: {e.strerror}") from None
