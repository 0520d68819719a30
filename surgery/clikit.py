"""Shared plumbing of the three command-line tools (surgery, growth, xross).

The CLIs are thin: they parse options, call the library, and print rich tables. A
:class:`SurgeryError` (bad input) becomes one red line on stderr and exit status 2.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from surgery.errors import SurgeryError, UserError

console = Console()
err_console = Console(stderr=True)


def run_app(app: typer.Typer, argv: Sequence[str] | None = None) -> None:
    """Run a typer app; library errors print one line and exit with status 2 (no traceback)."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name=None, standalone_mode=True)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)


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


def load_model_arg(
    name_or_dir: str,
    *,
    num_classes: int | None = None,
    weights: Path | None = None,
    trust_code: bool = False,
    extra: dict[str, Any] | None = None,
) -> Any:
    """A model from a CLI argument: a saved directory, a torchvision name, or ``package.module:callable``."""
    from surgery.io import RECIPE_FILE, load
    from surgery.models import build_model, load_weights

    path = Path(name_or_dir)
    if (path / RECIPE_FILE).is_file():
        model = load(path, trust_code=trust_code)
        if weights is not None:
            load_weights(model, weights)
        return model
    return build_model(name_or_dir, num_classes=num_classes, weights=weights, trust_code=True, **(extra or {}))


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], justify: Callable[[str], str] | None = None) -> Table:
    """A rich table; numeric-looking columns are right-aligned."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, justify=(justify(c) if justify else "left"))  # type: ignore[arg-type]
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t
