"""The query table of a run: which network (path, or width-resolution setting) to use for a budget.

MutualNet ships a table that picks, for a FLOPs budget, the best width-resolution pair of
one set of weights. Built from a run's ``eval.json`` (and its ``latency.json`` when
measured), :func:`query_rows` gives the Pareto front over FLOPs: every row is more accurate
than every cheaper one. :func:`write_query_files` saves it as CSV and as a PNG plot of
accuracy against FLOPs (all rows, the front joined by a line).

>>> from xross.run.evaluate import PathResult
>>> rows = [PathResult(path=(), name="1-32", role="setting", width=1.0, resolution=32,
...                    top1=80.0, top5=99.0, params=2_000_000, flops=6e7),
...         PathResult(path=(), name="0.5-32", role="setting", width=0.5, resolution=32,
...                    top1=75.0, top5=98.0, params=600_000, flops=1.6e7),
...         PathResult(path=(), name="0.75-24", role="setting", width=0.75, resolution=24,
...                    top1=70.0, top5=97.0, params=1_200_000, flops=2e7)]
>>> [r.name for r in query_rows(rows)]
['0.5-32', '1-32']
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from surgery.core.util import atomic_write_text
from surgery.graph.flops import FLOPS_COLUMN, human
from xross.analysis.plots import pyplot, save_png
from xross.errors import XrossError
from xross.run.evaluate import PathResult, pareto_front

QUERY_CSV = "query.csv"
QUERY_PNG = "query.png"
COLUMNS = [FLOPS_COLUMN, "network", "width", "resolution", "top-1", "top-5", "params", "latency ms"]


def query_rows(results: Sequence[PathResult]) -> list[PathResult]:
    """The Pareto front over FLOPs of a run's networks (teachers excluded), cheapest first."""
    return pareto_front([r for r in results if r.role != "teacher"], cost="flops")


def row_values(r: PathResult, latency: Mapping[str, float] | None) -> list[str]:
    ms = latency.get(r.name) if latency else None
    return [
        human(r.flops),
        r.name,
        f"{r.width:g}" if r.width is not None else "",
        str(r.resolution) if r.resolution is not None else "",
        f"{r.top1:.2f}",
        f"{r.top5:.2f}",
        human(r.params),
        f"{ms:.2f}" if ms is not None else "",
    ]


def write_query_files(
    run: Path, results: Sequence[PathResult], latency: Mapping[str, float] | None = None
) -> list[Path]:
    """Save ``query.csv`` (the Pareto rows) and, with matplotlib installed, ``query.png``; returns the paths."""
    rows = query_rows(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["flops", "network", "width", "resolution", "top1", "top5", "params", "latency_ms"])
    for r in rows:
        ms = latency.get(r.name) if latency else None
        writer.writerow([r.flops, r.name, r.width, r.resolution, r.top1, r.top5, r.params, ms])
    atomic_write_text(run / QUERY_CSV, buffer.getvalue())
    written = [run / QUERY_CSV]
    plt = pyplot()
    if plt is None:
        return written
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r.flops / 1e6 for r in results], [r.top1 for r in results], s=14, color="0.6", label="every network")
    ax.plot([r.flops / 1e6 for r in rows], [r.top1 for r in rows], "o-", color="C0", label="query table (Pareto)")
    for r in rows:
        ax.annotate(r.name, (r.flops / 1e6, r.top1), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(run.name)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_png(fig, run / QUERY_PNG)
    return [*written, run / QUERY_PNG]


def parse_ms(text: str) -> float:
    """``'5ms' -> 5.0``, ``'0.2s' -> 200.0``, ``'7' -> 7.0`` (milliseconds)."""
    value = text.strip().lower()
    scale = 1.0
    if value.endswith("ms"):
        value = value[:-2]
    elif value.endswith("s"):
        value, scale = value[:-1], 1e3
    try:
        return float(value) * scale
    except ValueError:
        raise XrossError(f"latency budget '{text}' is not a time; give e.g. 5ms or 0.2s") from None
