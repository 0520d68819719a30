"""Any-time inference on CIFAR-10: two nets cut into 3 parts with exit heads, XML vs independent training.

ResNet-18 and MobileNetV2 (ImageNet stems, 32x32 inputs), each cut after its 1/4 and 3/4 stages
(``layer1``/``features.3`` and ``layer3``/``features.10``), so the grid has 2 rows of very different
cost, 3 columns, 4 exit heads and 8 routes. For each seed, the same data (a stratified subset of the
training split, a tenth of it held out for calibration), epochs and optimiser (Adam 1e-3, cosine
after a 0.3-epoch warm-up) for:

(a) ``--mode xml --exits``: the pieces trained to be interchangeable, each exit head also on the
    stitched features arriving at it;
(b) ``--mode independent --exits``: each net and its heads alone (its stitched routes use adapters
    trained by nobody, as in the research's baseline).

Each run then gets its latency table (``xross profile``: every part, adapter and head at batch 1 on
this machine) and its any-time report (``xross anytime``): the accuracy-vs-deadline curve over every
route; budgeted batch classification at 25/50/75/100 % of the costliest path's FLOPs with exit
thresholds calibrated on the held-out images; the best full path within each budget; and every
deadline of the curve answered on the wall clock for ``--wall-clock`` test images one at a time
(an answer later than its deadline + 10 % is a violation).

    python bench/anytime_cifar10.py                                   # ~35 min on 2 CPU cores
    python bench/anytime_cifar10.py --seeds 1 --subset 1000 --epochs 1 --wall-clock 20   # a smoke run

Needs ../shared/data/cifar10-jpeg.tar.xz (or --data). Runs go to runs/anytime-bench/ (gitignored).
Last line: {"exits": n, "routes": r, "acc_at_budget": {"25%": a, ...}, "best_full_path_at_budget": {...},
"full_path_acc": f, "deadline_violations": v, ...} for XML (means over seeds), the same for independent
training under "independent".
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import xross
from xross.anytime.latency import latency_table
from xross.anytime.report import AnytimeReport, anytime_report, write_anytime_files
from xross.run.directory import load_run

ROOT = Path(__file__).resolve().parent.parent
NETS = ["resnet18", "mobilenet_v2"]
CUTS = ["layer1,features.3", "layer3,features.10"]
MODES = ("xml", "independent")
SHARES = (0.25, 0.5, 0.75, 1.0)


def run_one(mode: str, seed: int, args: argparse.Namespace) -> AnytimeReport:
    """Train one cohort with exits, time its pieces, and write its any-time report."""
    out = args.runs / f"{mode}-s{seed}"
    xross.train(
        nets=NETS, cuts=CUTS, mode=mode, exits=True, data=args.data, subset=args.subset,
        eval_subset=args.eval_subset, epochs=args.epochs, batch_size=args.batch_size, optimizer="adam",
        lr=args.lr, lr_schedule="cosine", warmup_epochs=args.warmup, seed=seed, eval_every=0, out=str(out),
        force=True, progress=False,
    )  # fmt: skip
    cfg, cohort = load_run(out)
    (out / "latency.json").unlink(missing_ok=True)
    table = latency_table(out, repeats=args.repeats)
    report = anytime_report(
        cfg, cohort, table, shares=SHARES, deadlines=args.deadlines, wall_clock=args.wall_clock,
        progress=lambda text: print(f"  {mode} s{seed}: {text}", flush=True),
    )  # fmt: skip
    write_anytime_files(out, report)
    return report


def pct(share: float) -> str:
    return f"{100 * share:g}%"


def summary(reports: list[AnytimeReport]) -> dict:
    """Means over seeds of what the last JSON line reports."""

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return round(statistics.mean(kept), 2) if len(kept) == len(values) else None

    by_share = {pct(s): [next(b for b in r.budgets if b.share == s) for r in reports] for s in SHARES}
    return {
        "exits": reports[0].exits,
        "routes": reports[0].routes,
        "acc_at_budget": {k: mean([b.top1 for b in rows]) for k, rows in by_share.items()},
        "best_full_path_at_budget": {k: mean([b.full_path_top1 for b in rows]) for k, rows in by_share.items()},
        "spent_at_budget": {
            k: mean([b.mean_flops / b.budget_flops if b.mean_flops else None for b in rows])
            for k, rows in by_share.items()
        },
        "full_path_acc": mean([r.full_path_top1 for r in reports]),
        "deadline_violations": sum(r.deadline_violations for r in reports),
        "answers": sum(r.wall_clock_answers for r in reports),
    }


def print_tables(console: Console, reports: dict[str, list[AnytimeReport]]) -> None:
    budget = Table(title="budgeted batch classification: test top-1 (mean over seeds) at a mean FLOP budget")
    for column in ("mode", "budget", "exits + thresholds", "FLOPs spent / budget", "best full path", "routes chosen"):
        budget.add_column(column)
    for mode, runs in reports.items():
        for s in SHARES:
            rows = [next(b for b in r.budgets if b.share == s) for r in runs]
            tops = [b.top1 for b in rows if b.top1 is not None]
            spent = [b.mean_flops / b.budget_flops for b in rows if b.mean_flops]
            fulls = [b.full_path_top1 for b in rows if b.full_path_top1 is not None]
            budget.add_row(
                mode, pct(s), f"{statistics.mean(tops):.2f}" if tops else "-",
                f"{statistics.mean(spent):.3f}" if spent else "-", f"{statistics.mean(fulls):.2f}" if fulls else "-",
                " ".join("-".join(map(str, b.path)) if b.path else "none" for b in rows),
            )  # fmt: skip
    console.print(budget)
    curve = Table(title="any-time: test top-1 at a deadline (seed 0; ms at batch 1 on this machine)")
    columns = ("mode", "deadline ms", "route", "answers after", "top-1", "best full path top-1", "wall-clock top-1")
    for column in columns:
        curve.add_column(column)
    for mode, runs in reports.items():
        r = runs[0]
        for d in r.deadlines:
            wall = r.wall_clock_top1.get(f"{d.deadline_ms:.3f}")
            curve.add_row(
                mode, f"{d.deadline_ms:.2f}", "-".join(map(str, d.path)), "-".join(map(str, d.prefix)),
                f"{d.top1:.2f}", f"{d.full_path_top1:.2f}" if d.full_path_top1 is not None else "-",
                f"{wall:.1f}" if wall is not None else "-",
            )  # fmt: skip
    console.print(curve)


def plot(reports: dict[str, list[AnytimeReport]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for n, (mode, runs) in enumerate(reports.items()):
        for s, r in enumerate(runs):
            style = {"color": f"C{n}", "alpha": 1.0 if s == 0 else 0.5}
            label = mode if s == 0 else None
            left.step([d.deadline_ms for d in r.deadlines], [d.top1 for d in r.deadlines], where="post",
                      label=f"{label}, exits" if label else None, **style)  # fmt: skip
            full = [(d.deadline_ms, d.full_path_top1) for d in r.deadlines if d.full_path_top1 is not None]
            left.step(*zip(*full), where="post", linestyle=":", label=f"{label}, full paths" if label else None,
                      **style)  # fmt: skip
            kept = [b for b in r.budgets if b.mean_flops]
            right.plot([b.mean_flops / 1e6 for b in kept], [b.top1 for b in kept], "o-",
                       label=f"{label}, exits + thresholds" if label else None, **style)  # fmt: skip
            fulls = [b for b in r.budgets if b.full_path_top1 is not None]
            right.plot([b.budget_flops / 1e6 for b in fulls], [b.full_path_top1 for b in fulls], "s:",
                       label=f"{label}, best full path" if label else None, **style)  # fmt: skip
    left.set_xscale("log")
    left.set_xlabel("deadline (ms, batch 1, 2 CPU cores)")
    left.set_ylabel("test top-1 (%)")
    left.set_title("any-time prediction")
    left.legend(fontsize=7, loc="lower right")
    right.set_xlabel("mean MFLOPs per image")
    right.set_ylabel("test top-1 (%)")
    right.set_title("budgeted batch classification")
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--subset", type=int, default=5000, help="training images (a tenth held out)")
    parser.add_argument("--eval-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam, cosine schedule after the warm-up")
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up epochs")
    parser.add_argument("--deadlines", type=int, default=12, help="deadlines on the any-time curve")
    parser.add_argument("--wall-clock", type=int, default=100, help="test images answered alone per deadline")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per latency-table entry")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "anytime-bench")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "anytime")
    parser.add_argument("--report-only", action="store_true", help="read the reports in --runs again, train nothing")
    args = parser.parse_args()
    console = Console(width=150)
    start = time.time()
    reports: dict[str, list[AnytimeReport]] = {m: [] for m in MODES}
    for seed in range(args.seeds):
        for mode in MODES:
            if args.report_only:
                reports[mode].append(AnytimeReport.load(args.runs / f"{mode}-s{seed}"))
                continue
            console.print(f"[{(time.time() - start) / 60:.1f} min] training {mode} with exits, seed {seed}")
            reports[mode].append(run_one(mode, seed, args))
    print_tables(console, reports)
    args.report.mkdir(parents=True, exist_ok=True)
    plot(reports, args.report / "curves.png")
    for mode, runs in reports.items():
        for seed in range(len(runs)):
            shutil.copy(args.runs / f"{mode}-s{seed}" / "anytime.json", args.report / f"{mode}-s{seed}.json")
    result = {
        **summary(reports["xml"]),
        "independent": summary(reports["independent"]),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "subset": args.subset,
        "minutes": round((time.time() - start) / 60, 1),
    }
    previous = args.report / "anytime_cifar10.json"
    if args.report_only and previous.is_file():  # the training's minutes, not the re-reading's
        result["minutes"] = json.loads(previous.read_text())["minutes"]
    (args.report / "anytime_cifar10.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
