"""The research's from-scratch experiment in miniature, on the shared CIFAR-10 JPEGs.

ResNet34 (net 0) and ResNet18 (net 1), torchvision's, cut after layer2, trained from
scratch by Independent, DML and XML with the same data, epochs and optimiser, for
several seeds. Reports top-1 of each net, the 2-net ensemble, and (XML) every
stitched path with its parameters; writes the figures as JSON and a plot of
accuracy against parameters for every path.

    python bench/xross_cifar10.py                  # the defaults below: ~45 min on 2 cores
    python bench/xross_cifar10.py --subset 1000 --epochs 2 --seeds 0   # a quick look

Last line: {"seeds", "independent": [a, b], "dml": [a, b], "xml": [a, b],
"xml_paths_min", "xml_paths_max", "ensemble": {"independent", "dml", "xml"}} (means over seeds, %)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xross.config import TrainConfig
from xross.evaluate import EvalResult
from xross.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
MODES = ("independent", "dml", "xml")
NETS = ["resnet34", "resnet18"]


def run(mode: str, seed: int, args: argparse.Namespace) -> EvalResult:
    cfg = TrainConfig(
        nets=NETS,
        cuts=["layer2"],
        mode=mode,
        data=args.data,
        subset=args.subset,
        eval_subset=args.eval_subset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer="adam",
        lr=args.lr,
        lr_schedule="cosine",
        seed=seed,
        eval_every=0,
        out=str(args.runs / f"{mode}-seed{seed}"),
    )
    return Trainer(cfg, force=True, progress=not args.quiet, command=f"bench/xross_cifar10.py {mode} seed {seed}").fit()


def plot(results: dict[str, list[EvalResult]], path: Path) -> bool:
    """Top-1 against parameters of every path, one colour per method (mean over seeds, bars: min-max)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k, (mode, marker) in enumerate(zip(MODES, ("s", "^", "o"))):
        for i, first in enumerate(results[mode][0].paths):
            tops = [res.paths[i].top1 for res in results[mode]]
            mean = statistics.mean(tops)
            x = first.params / 1e6 + (k - 1) * 0.25  # side by side, so the methods do not hide each other
            ax.errorbar(
                x,
                mean,
                yerr=[[mean - min(tops)], [max(tops) - mean]],
                fmt=marker,
                color=f"C{k}",
                capsize=3,
                label=mode if i == 0 else None,
            )
    for r in results["xml"][0].paths:
        ax.annotate(
            r.name.replace("resnet", "R"), (r.params / 1e6, 2), fontsize=8, ha="center", rotation=90, va="bottom"
        )
    ax.set_ylim(0, None)
    ax.set_xlabel("parameters of the path (M)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("every path (up half > down half) after each method; mean over seeds, bars min-max")
    ax.grid(alpha=0.3)
    ax.legend(loc="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def replot(report: Path) -> None:
    """Redraw the plot from a saved ``xross_cifar10.json`` (no training)."""
    detail = json.loads((report / "xross_cifar10.json").read_text())
    results = {m: [EvalResult.from_json(r) for r in detail["runs"][m]] for m in MODES}
    plot(results, report / "xross_cifar10_paths.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))
    ap.add_argument("--subset", type=int, default=4000, help="training images (stratified)")
    ap.add_argument("--eval-subset", type=int, default=2000, help="test images (stratified)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-cifar10", help="run directories")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "results", help="where the JSON and the plot go")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from REPORT/xross_cifar10.json")
    args = ap.parse_args()
    if args.replot:
        replot(args.report)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    console = Console()
    start = time.time()
    results: dict[str, list[EvalResult]] = {m: [] for m in MODES}
    for seed in seeds:
        for mode in MODES:
            console.print(f"[bold]{mode}[/] seed {seed} ({(time.time() - start) / 60:.1f} min so far)")
            results[mode].append(run(mode, seed, args))
    minutes = (time.time() - start) / 60

    def own(mode: str, net: int) -> float:
        return statistics.mean(r.own(net, 2).top1 for r in results[mode])

    def ensemble(mode: str) -> float:
        return statistics.mean(r.ensembles["nets"].top1 for r in results[mode])

    table = Table(
        title=(
            f"top-1 %, mean over seeds {seeds} ({args.subset} train / {args.eval_subset} test "
            f"images, {args.epochs} epochs)"
        ),
        title_justify="left",
    )
    for col in ("method", *NETS, "2-net ensemble"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for mode in MODES:
        table.add_row(mode, f"{own(mode, 0):.2f}", f"{own(mode, 1):.2f}", f"{ensemble(mode):.2f}")
    console.print(table)
    paths = Table(title="every path (mean over seeds)", title_justify="left")
    for col in ("path", "params", *MODES):
        paths.add_column(col, justify="right" if col != "path" else "left")
    first = results["xml"][0].paths
    for k, r in enumerate(first):
        paths.add_row(
            r.name,
            f"{r.params / 1e6:.1f}M",
            *(f"{statistics.mean(res.paths[k].top1 for res in results[m]):.2f}" for m in MODES),
        )
    console.print(paths)
    xml_paths = [statistics.mean(res.paths[k].top1 for res in results["xml"]) for k in range(len(first))]
    summary = {
        "seeds": len(seeds),
        "independent": [round(own("independent", 0), 2), round(own("independent", 1), 2)],
        "dml": [round(own("dml", 0), 2), round(own("dml", 1), 2)],
        "xml": [round(own("xml", 0), 2), round(own("xml", 1), 2)],
        "xml_paths_min": round(min(xml_paths), 2),
        "xml_paths_max": round(max(xml_paths), 2),
        "ensemble": {m: round(ensemble(m), 2) for m in MODES},
    }
    args.report.mkdir(parents=True, exist_ok=True)
    detail = {
        "summary": summary,
        "minutes": round(minutes, 1),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "runs": {m: [r.to_json() for r in results[m]] for m in MODES},
    }
    (args.report / "xross_cifar10.json").write_text(json.dumps(detail, indent=1) + "\n")
    if plot(results, args.report / "xross_cifar10_paths.png"):
        console.print(f"plot: {args.report / 'xross_cifar10_paths.png'}")
    console.print(f"total {minutes:.1f} min")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
