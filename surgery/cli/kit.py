"""Shared plumbing of the three command-line tools (surgery, growth, xross).

The CLIs are thin: they parse options, call the library, and print rich tables. A
:class:`SurgeryError` (bad input) becomes one red line on stderr and exit status 2.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from surgery.core.errors import SurgeryError, UserError
from surgery.graph.flops import FLOPS_COLUMN, CountedOn, flops_note

console = Console()
err_console = Console(stderr=True)


def _one_line_warning(
    message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


# the library's errors name Python parameters; on the command line the same input is an option
_SHELL_NAMES = (("example_input=...", "--input"), ("example_input=", "--input"))


def shell_wording(message: str) -> str:
    """A library error as a shell user should read it: the Python parameter's name becomes the option's.

    >>> shell_wording("cannot run Bert on an image; pass example_input= an input the model accepts")
    'cannot run Bert on an image; pass --input an input the model accepts'
    """
    for python, option in _SHELL_NAMES:
        message = message.replace(python, option)
    return message


def run_app(app: typer.Typer, argv: Sequence[str] | None = None) -> None:
    """Run a typer app: library errors and usage errors print one line and exit with status 2 (no traceback).

    Warnings print as one line too (``warning: ...``).
    """
    show = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        code = app(args=list(argv) if argv is not None else None, prog_name=app.info.name, standalone_mode=False)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {escape(shell_wording(str(e)))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except click_exceptions.UsageError as e:
        where = f"; see '{e.ctx.command_path} --help'" if e.ctx is not None else ""
        message = escape(" ".join(e.format_message().replace("Value error, ", "").split()).rstrip("."))
        err_console.print(f"[bold red]error:[/] {message}{where}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    finally:
        warnings.showwarning = show
    sys.exit(code if isinstance(code, int) else 0)


def fail(message: str) -> None:
    """Raise the one-line user error (exit 2) from CLI code."""
    raise SurgeryError(message)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224" -> (1, 3, 224, 224)``."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SurgeryError(f"--input '{text}' is not a shape; write positive integers like 1,3,224,224")
    return tuple(int(p) for p in parts)


def default_input_shape(source: str) -> tuple[int, ...]:
    """The input a torchvision classification model expects (inception_v3: 299; others: 224)."""
    return (1, 3, 299, 299) if source == "inception_v3" else (1, 3, 224, 224)


def example_for(model: Any, inputs: Sequence[str] | None) -> Any:
    """The example input of a command: ``--input`` items (``[name=][dtype:]shape``), else a guess from the model."""
    from surgery.graph.inputs import Example, default_example, vocab_size

    return Example.parse(inputs, vocab_size(model)) if inputs else default_example(model)


def load_model_arg(
    reference: str,
    *,
    num_classes: int | None = None,
    weights: Path | None = None,
    trust_code: bool = False,
    verify: bool = True,
) -> Any:
    """The model a CLI argument names (see :mod:`surgery.files.refs`); names typed on the command line are trusted."""
    from surgery.files.refs import load

    return load(
        reference, trust_code=trust_code, trust_typed=True, num_classes=num_classes, weights=weights, verify=verify
    )


def table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], justify: Callable[[str], str] | None = None
) -> Table:
    """A rich table; numeric-looking columns are right-aligned."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, justify=(justify(c) if justify else "left"))  # type: ignore[arg-type]
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t


def print_table(t: Table, flops_on: CountedOn | None = None) -> None:
    """Print ``t``; with ``flops_on``, then the line naming the input its FLOPs were counted on.

    A table with FLOPs shows them per sample (:func:`surgery.graph.flops.per_sample`) in a
    column headed ``FLOPs per sample`` and passes the input they were counted on here, so
    every command says the same thing the same way (:func:`surgery.graph.flops.flops_note`).
    """
    for column in t.columns:  # the long header wraps ("FLOPs per" / "sample") rather than squeeze the names
        if FLOPS_COLUMN in str(column.header):
            widest = max((len(str(cell)) for cell in column.cells), default=0)
            column.max_width = max(widest, len(FLOPS_COLUMN.rpartition(" ")[0]))
    console.print(t)
    if flops_on is not None:
        console.print(flops_note(flops_on), highlight=False, soft_wrap=True)


# --- command-line options generated from a declared model (one source for defaults, types, choices, help)

CLI_HINT = "cli"  # a field's json_schema_extra may hold {"cli": {"name": "cut", "comma": True}}


def _cli_hint(field: Any) -> dict[str, Any]:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    hint = extra.get(CLI_HINT) or {}
    return hint if isinstance(hint, dict) else {}


def _option_type(annotation: Any, comma: bool) -> Any:
    """A field's CLI type: ``Optional`` of its scalar type, a Literal's choices, a repeatable list or comma text."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _option_type(args[0], comma)
    if origin is typing.Annotated:
        return _option_type(args[0], comma)
    if origin is list:
        return str if comma else list[str]
    return annotation


def option_name(field_name: str, field: Any) -> str:
    """The parameter name of a field's option (``cuts`` -> ``cut`` where the field says so)."""
    return str(_cli_hint(field).get("name") or field_name)


def options_from_model(model: type[Any], exclude: Sequence[str] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per field of pydantic ``model``, typed and documented for typer.

    Every option defaults to None (meaning "not given"): a bool becomes ``--x/--no-x``,
    a Literal its choices, a list a repeatable option (or comma-separated text when the
    field's hint says ``comma``), and the help is the field's description and default.
    """
    params = []
    order = model.ordered_fields() if hasattr(model, "ordered_fields") else list(model.model_fields)
    for name in order:
        field = model.model_fields[name]
        if name in exclude:
            continue
        hint = _cli_hint(field)
        cli_name = option_name(name, field)
        kind = _option_type(field.annotation, bool(hint.get("comma")))
        flag = f"--{cli_name.replace('_', '-')}"
        decl = f"{flag}/--no-{cli_name.replace('_', '-')}" if kind is bool else flag
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) and hint.get("comma") else default
        text = f"{field.description or name} [default: {shown}]"
        option = typer.Option(decl, help=text, show_default=False)
        params.append(
            inspect.Parameter(
                cli_name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], option]
            )
        )
    return params


def model_values(model: type[Any], given: dict[str, Any]) -> dict[str, Any]:
    """Field values from the options a user gave (None: not given); comma text is split into a list."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        value = given.get(option_name(name, field))
        if value is None:
            continue
        if _cli_hint(field).get("comma") and isinstance(value, str):
            value = _comma_list(field, value)
        out[name] = value
    return out


def _comma_list(field: Any, text: str) -> list[Any]:
    """``"a,b"`` as the field's list: references split where commas separate them, numbers as numbers."""
    from pydantic import TypeAdapter, ValidationError

    from surgery.files.refs import split_references

    items = split_references(text)
    try:  # "8,2" for a list of ints; what does not convert is left for the model to report
        return list(TypeAdapter(field.annotation).validate_python(items, strict=False))
    except ValidationError:
        return items


def with_signature(fn: Callable[..., Any], params: Sequence[inspect.Parameter]) -> Callable[..., Any]:
    """Give ``fn(**options)`` the signature typer reads its options from."""
    fn.__signature__ = inspect.Signature(list(params))  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn
