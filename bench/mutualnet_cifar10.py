"""MutualNet vs US-Net vs independent training on CIFAR-10: one network at every width and resolution.

Three settings, the same net (ResNet-18, ImageNet stem, 32x32 inputs), epochs, optimiser (Adam 1e-3,
cosine after 0.3 warm-up epochs) and data (a stratified subset of the training split), for each seed:
(a) MutualNet: the sandwich rule over widths 0.25:1.0 *and* resolutions 32,28,24,20 with inplace
    distillation (``xross train --mode mutualnet``);
(b) US-Net style: the same over widths only, at 32 pixels;
(c) the full-width network trained alone (``--sandwich 1``).
Each run is evaluated on the grid widths {1, 0.75, 0.5, 0.25} x its resolutions, BatchNorm
recalibrated per setting. The query tables of (a) and (b) are compared at (a)'s Pareto FLOPs
points: at each, the best (b) setting within that many FLOPs (means over seeds).

    python bench/mutualnet_cifar10.py                               # ~30 min on 2 CPU cores
    python bench/mutualnet_cifar10.py --seeds 1 --subset 1000 --epochs 1   # a smoke run

Needs ../shared/data/cifar10-jpeg.tar.xz (or --data). Runs go to runs/mutualnet-bench/ (gitignored).
Last line: {"widths": [...], "mutualnet_full": a, "usnet_full": b, "independent_full": c,
"mutualnet_min_flops_acc": d, "usnet_min_flops_acc": e, "mutualnet_beats_usnet_points": "k/n", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import xross
from surgery.graph.flops import human
from xross.anytime.query import query_rows, write_query_files
from xross.run.evaluate import EvalResult, PathResult

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "mutualnet": {"widths": "0.25:1.0", "resolutions": [32, 28, 24, 20], "sandwich": 4},
    "usnet": {"widths": "0.25:1.0", "resolutions": [32], "sandwich": 4},
    "independent": {"widths": "1.0:1.0", "resolutions": [32], "sandwich": 1, "eval_widths": [1.0]},
}
WIDTHS = [1.0, 0.75, 0.5, 0.25]


def run_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    return args.runs / f"{name}-s{seed}"


def run_one(name: str, seed: int, args: argparse.Namespace) -> None:
    """Train one setting (its evaluation lands in the run's eval.json, its query table beside it)."""
    out = run_dir(args, name, seed)
    options = dict(SETTINGS[name])
    options.setdefault("eval_widths", WIDTHS)
    result = xross.train(
        mode="mutualnet",
        nets=[args.net],
        stem=args.stem,
        data=args.data,
        subset=args.subset,
        eval_subset=args.eval_subset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer="adam",
        lr=args.lr,
        lr_schedule="cosine",
        warmup_epochs=args.warmup,
        seed=seed,
        eval_every=0,
        out=str(out),
        force=True,
        progress=False,
        **options,
    )
    write_query_files(out, result.paths)


def read_run(path: Path) -> dict[tuple[float, int], tuple[float, float]]:
    """{(width, resolution): (top-1, FLOPs)} from a run's eval.json."""
    result = EvalResult.load(path / "eval.json")
    return {(r.width, r.resolution): (r.top1, r.flops) for r in result.paths}  # type: ignore[misc]


def mean_table(runs: list[dict]) -> dict[tuple[float, int], tuple[float, float]]:
    keys = runs[0].keys()
    return {k: (statistics.mean(r[k][0] for r in runs), runs[0][k][1]) for k in keys}


def best_within(table: dict[tuple[float, int], tuple[float, float]], flops: float) -> float | None:
    fits = [top1 for top1, f in table.values() if f <= flops * 1.0001]
    return max(fits) if fits else None


def write_report(report: Path, tables: dict, per_seed: dict, front: list[PathResult], summary: dict) -> None:
    """``mutualnet_cifar10.json`` (every setting of every method, per seed and mean) and ``curves.png``."""
    report.mkdir(parents=True, exist_ok=True)

    def rows(table: dict) -> list[dict]:
        return [{"width": w, "resolution": r, "top1": a, "flops": f} for (w, r), (a, f) in sorted(table.items())]

    data = {
        "summary": summary,
        "mean": {name: rows(tab) for name, tab in tables.items()},
        "per_seed": {name: [rows(t) for t in runs] for name, runs in per_seed.items()},
    }
    (report / "mutualnet_cifar10.json").write_text(json.dumps(data, indent=1) + "\n")
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    mutual = tables["mutualnet"]
    ax.scatter([f / 1e6 for _, f in mutual.values()], [a for a, _ in mutual.values()], s=12, color="C0", alpha=0.4)
    ax.plot([r.flops / 1e6 for r in front], [r.top1 for r in front], "o-", color="C0", label="MutualNet (query table)")
    for r in front:
        ax.annotate(r.name, (r.flops / 1e6, r.top1), fontsize=7, xytext=(3, -9), textcoords="offset points")
    us = sorted(tables["usnet"].items(), key=lambda kv: kv[1][1])
    ax.plot([f / 1e6 for _, (_, f) in us], [a for _, (a, _) in us], "s--", color="C1", label="US-Net (widths, 32 px)")
    ind = tables["independent"][1.0, 32]
    ax.plot([ind[1] / 1e6], [ind[0]], "k*", markersize=10, label="independent (full width)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("top-1 (%), mean of seeds")
    ax.set_title("CIFAR-10: one ResNet-18 at every width and resolution")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "curves.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))
    parser.add_argument("--net", default="resnet18")
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--subset", type=int, default=6000)
    parser.add_argument("--eval-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam, cosine schedule after the warm-up")
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up epochs")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "mutualnet-bench")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "mutualnet")
    parser.add_argument("--report-only", action="store_true", help="read the runs in --runs again, train nothing")
    args = parser.parse_args()
    console = Console()
    start = time.perf_counter()
    tables: dict[str, dict] = {}
    per_seed: dict[str, list[dict]] = {}
    for name in SETTINGS:
        for seed in range(args.seeds):
            if not args.report_only:
                t = time.perf_counter()
                run_one(name, seed, args)
                console.print(f"{name} seed {seed}: {(time.perf_counter() - t) / 60:.1f} min", highlight=False)
            per_seed.setdefault(name, []).append(read_run(run_dir(args, name, seed)))
        tables[name] = mean_table(per_seed[name])
    for name, tab in tables.items():
        grid = Table(title=f"{name}: top-1 (mean of {args.seeds} seeds) and FLOPs per setting")
        for col in ("width", "resolution", "top-1", "FLOPs"):
            grid.add_column(col)
        for (w, r), (top1, flops) in sorted(tab.items(), key=lambda kv: -kv[1][1]):
            grid.add_row(f"{w:g}", str(r), f"{top1:.2f}", human(flops))
        console.print(grid)
    mutual, usnet = tables["mutualnet"], tables["usnet"]
    front = query_rows(
        [
            PathResult(
                path=(), name=f"{w:g}-{r}", role="setting", width=w, resolution=r, top1=a, top5=a, params=0, flops=f
            )
            for (w, r), (a, f) in mutual.items()
        ]
    )
    compare = Table(title="query tables at MutualNet's Pareto FLOPs points (US-Net: best setting within the FLOPs)")
    for col in ("FLOPs", "MutualNet setting", "MutualNet top-1", "US-Net top-1"):
        compare.add_column(col)
    beats = points = 0  # only points where US-Net has a setting within the FLOPs count
    for row in front:
        other = best_within(usnet, row.flops)
        points += other is not None
        beats += other is not None and row.top1 > other
        compare.add_row(human(row.flops), row.name, f"{row.top1:.2f}", f"{other:.2f}" if other is not None else "-")
    console.print(compare)
    min_flops = min(f for _, f in usnet.values())
    summary = {
        "widths": WIDTHS,
        "mutualnet_full": round(mutual[1.0, 32][0], 2),
        "usnet_full": round(usnet[1.0, 32][0], 2),
        "independent_full": round(tables["independent"][1.0, 32][0], 2),
        "mutualnet_min_flops_acc": round(best_within(mutual, min_flops) or 0.0, 2),
        "usnet_min_flops_acc": round(usnet[min(WIDTHS), 32][0], 2),
        "mutualnet_beats_usnet_points": f"{beats}/{points}",
        "full_per_seed": {name: [round(run[1.0, 32][0], 2) for run in runs] for name, runs in per_seed.items()},
        "seeds": args.seeds,
        "epochs": args.epochs,
        "subset": args.subset,
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }
    previous = args.report / "mutualnet_cifar10.json"
    if args.report_only and previous.is_file():  # the time is the training's, not this report's
        summary["minutes"] = json.loads(previous.read_text())["summary"]["minutes"]
    write_report(args.report, tables, per_seed, front, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
