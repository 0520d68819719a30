"""Slim every torchvision classification model to half width and extract it as a plain network.

For each model (random weights, the surgery bench's small input): ``surgery.slim(model, 0.5)``,
then ``extract()``. A model counts as *slimmed* when FLOPs(0.5) / FLOPs(1) <= 0.35 (the ideal is
0.25: every layer's input and output halve) and as *exact* when the view at 0.5 and the extracted
network give the same output bit for bit (eval mode, float32). Constant weights of a fresh model
(unit BatchNorm statistics, zero heads) are given random values first, so that a wrongly sliced
statistic would show.

    python bench/slim_zoo.py                          # all 80 models (about 10 minutes on 2 cores)
    python bench/slim_zoo.py --models resnet18,vit_b_16 --width 0.25 --divisor 4

Last line: {"models": 80, "slims": s, "exact": e, "median_flops_ratio": r, "width": 0.5, "divisor": 8, "minutes": m}.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from surgery_zoo import build  # the same models and small inputs as the surgery bench

import surgery
from growth.check import vary_constant_weights
from surgery.core.util import first_line

warnings.filterwarnings("ignore", category=FutureWarning)
SLIMMED = 0.35


@dataclass
class Row:
    name: str
    ratio: float = float("nan")
    exact: bool = False
    skipped: int = 0
    seconds: float = 0.0
    error: str = ""
    first_skip: str = ""

    @property
    def slimmed(self) -> bool:
        return self.ratio <= SLIMMED


def slim_one(name: str, width: float, divisor: int = 8) -> Row:
    start = time.perf_counter()
    row = Row(name)
    try:
        model, x = build(name)
        vary_constant_weights(model, torch.Generator().manual_seed(0))
        view = surgery.slim(model, width, divisor, example_input=x).eval()
        small = view.extract().eval()
        with torch.no_grad():
            row.exact = torch.equal(view(x), small(x))
        row.ratio = surgery.count_flops(small, x) / surgery.count_flops(model, x)
        row.skipped = len(view.skipped)
        row.first_skip = next((s for s in view.skipped if "model output" not in s), "")
    except Exception as e:  # a bench reports every failure and goes on
        row.error = first_line(e, 160)
    row.seconds = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated torchvision names (default: all classifiers)")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--divisor", type=int, default=8, help="kept channel counts are multiples of this")
    args = parser.parse_args()
    torch.manual_seed(0)
    names = args.models.split(",") if args.models else torchvision.models.list_models(torchvision.models)
    console = Console()
    start = time.perf_counter()
    rows = []
    for i, name in enumerate(names, 1):
        row = slim_one(name, args.width, args.divisor)
        rows.append(row)
        status = row.error or f"ratio {row.ratio:.3f} exact {row.exact} skipped {row.skipped}"
        console.print(f"[{i}/{len(names)}] {name}: {status} ({row.seconds:.1f}s)", highlight=False)
        gc.collect()
    table = Table(title=f"slim to width {args.width} and extract")
    for col in ("model", "FLOPs ratio", "slimmed", "exact", "groups at full width", "first reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, f"{r.ratio:.3f}", str(r.slimmed), str(r.exact), str(r.skipped), r.error or r.first_skip)
    console.print(table)
    ratios = [r.ratio for r in rows if not r.error]
    summary = {
        "models": len(rows),
        "slims": sum(r.slimmed for r in rows),
        "exact": sum(r.exact for r in rows),
        "median_flops_ratio": round(statistics.median(ratios), 3) if ratios else None,
        "width": args.width,
        "divisor": args.divisor,
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
