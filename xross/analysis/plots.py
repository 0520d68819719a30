"""Plots of the xross reports: matplotlib when it is installed (an optional extra), written atomically as PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from surgery.core.util import atomic_write


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as a PNG, atomically, close it, and return ``path``."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(png.getvalue()))
    return path
