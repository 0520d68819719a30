"""MEAL V2 in miniature: distil an XML cohort's stitched paths into its best net, on CIFAR-10.

1. Teachers (not counted in the budget): a two-net XML cohort (two torchvision ResNet18s,
   cut after layer2) trained on the shared CIFAR-10 JPEGs, or the run given with --teacher.
   Its K^P = 4 paths are the ensemble.
2. Student: the cohort's best full net (``RUN@i-i``, with its trained weights).
3. Every method continues the same student for the same epochs, data and optimiser:

   ========== ============================================================================
   ce         one-hot cross-entropy alone (more training; the teachers are not used)
   kd         Hinton KD from the ensemble: 0.5 CE + 0.5 T^2 soft CE at T=4
   meal_nodisc MEAL V2 without its discriminator: soft CE to the mean softmax at T=1, no labels
   meal       MEAL V2: the same, plus the joint discriminator
   ========== ============================================================================

   for each seed (data order, augmentation, the discriminator's init), evaluated on the full
   10,000-image test set.

    python bench/meal_cifar10.py                                   # the defaults: see --help
    python bench/meal_cifar10.py --teacher runs/meal-bench/xml     # reuse a trained cohort
    python bench/meal_cifar10.py --subset 2000 --epochs 1 --seeds 0 --eval-subset 1000  # a quick look

Last line: {"seeds", "ensemble", "ce", "kd", "meal_nodisc", "meal", ...} (mean top-1 %, spreads alongside).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from xross.methods.distiller import Distiller
from xross.methods.trainer import Trainer
from xross.run.config import DistillConfig, TrainConfig
from xross.run.evaluate import EvalResult

ROOT = Path(__file__).resolve().parents[1]
METHODS: dict[str, dict[str, Any]] = {
    "ce": {"soft_weight": 0.0, "hard_weight": 1.0, "discriminator": "off"},
    "kd": {"soft_weight": 0.5, "hard_weight": 0.5, "temperature": 4.0, "discriminator": "off"},
    "meal_nodisc": {"soft_weight": 1.0, "hard_weight": 0.0, "temperature": 1.0, "discriminator": "off"},
    "meal": {"soft_weight": 1.0, "hard_weight": 0.0, "temperature": 1.0, "discriminator": "joint"},
}


def train_teachers(args: argparse.Namespace) -> Path:
    out = args.runs / "xml"
    if (out / "eval.json").is_file() and not args.retrain:
        print(f"teachers: reusing {out}")
        return out
    cfg = TrainConfig(
        nets=["resnet18", "resnet18"],
        cuts=["layer2"],
        mode="xml",
        data=args.data,
        subset=args.teacher_subset,
        eval_subset=args.eval_subset,
        epochs=args.teacher_epochs,
        batch_size=args.batch_size,
        optimizer="adam",
        lr=1e-3,
        lr_schedule="cosine",
        seed=100,
        eval_every=0,
        out=str(out),
    )
    t0 = time.perf_counter()
    Trainer(cfg, force=True, progress=not args.quiet, command="bench/meal_cifar10.py teachers").fit()
    print(f"teachers: trained in {(time.perf_counter() - t0) / 60:.1f} min (not counted)")
    return out


def best_full_net(run: Path) -> str:
    result = EvalResult.load(run / "eval.json")
    parts = len(result.paths[0].path)
    full = [r for r in result.paths if len(set(r.path)) == 1]
    best = max(full, key=lambda r: r.top1)
    return f"{run}@{'-'.join([str(best.path[0])] * parts)}"


def distil(method: str, seed: int, teacher: Path, student: str, args: argparse.Namespace) -> EvalResult:
    cfg = DistillConfig(
        student=student,
        teacher=[str(teacher)],
        teacher_paths="all",
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
        out=str(args.runs / f"{method}-seed{seed}"),
        **METHODS[method],
    )
    command = f"bench/meal_cifar10.py {method} seed {seed}"
    return Distiller(cfg, force=True, progress=not args.quiet, command=command).fit()


def spread(values: list[float]) -> float:
    return max(values) - min(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.xz"))
    p.add_argument("--teacher", type=Path, help="a trained xross run to distil (default: train one)")
    p.add_argument("--retrain", action="store_true", help="train the teacher cohort again")
    p.add_argument("--teacher-subset", type=int, default=20000, help="teacher cohort's training images")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--subset", type=int, default=20000, help="training images of every method")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every method")
    p.add_argument("--eval-subset", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4, help="Adam, cosine schedule")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--runs", type=Path, default=ROOT / "runs/meal-bench")
    p.add_argument("--report", type=Path, default=ROOT / "docs/results/meal")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()

    teacher = args.teacher or train_teachers(args)
    student = best_full_net(teacher)
    print(f"student: {student}")
    results: dict[str, list[EvalResult]] = {m: [] for m in args.methods}
    minutes: dict[str, float] = {}
    t_all = time.perf_counter()
    for method in args.methods:
        t0 = time.perf_counter()
        for seed in args.seeds:
            results[method].append(distil(method, seed, teacher, student, args))
        minutes[method] = (time.perf_counter() - t0) / 60
    total_min = (time.perf_counter() - t_all) / 60

    first = results[args.methods[0]][0]
    ensemble = first.ensembles["teachers"].top1
    start = next(r.top1 for r in first.paths if r.role == "teacher" and r.name == student)
    table = Table(title=f"top-1 % on {first.samples} test images; student {student} (start {start:.2f})")
    for column in ("method", "mean", "spread (max-min)", "per seed", "vs start", "vs ensemble", "minutes"):
        table.add_column(column)
    summary: dict[str, Any] = {"seeds": len(args.seeds), "ensemble": round(ensemble, 2), "start": round(start, 2)}
    for method in args.methods:
        tops = [next(r.top1 for r in res.paths if r.role == "student") for res in results[method]]
        mean = statistics.mean(tops)
        summary[method] = round(mean, 2)
        summary[f"{method}_spread"] = round(spread(tops), 2)
        table.add_row(
            method,
            f"{mean:.2f}",
            f"{spread(tops):.2f}",
            " ".join(f"{t:.2f}" for t in tops),
            f"{mean - start:+.2f}",
            f"{mean - ensemble:+.2f}",
            f"{minutes[method]:.1f}",
        )
    teachers = [(r.name, r.top1) for r in first.paths if r.role == "teacher"]
    console = Console(width=140)
    console.print(table)
    console.print("teachers: " + ", ".join(f"{n.rsplit('@', 1)[-1]} {t:.2f}" for n, t in teachers))
    console.print(f"ensemble of the {len(teachers)} paths: {ensemble:.2f}; comparison took {total_min:.1f} min")
    summary["minutes"] = round(total_min, 1)
    args.report.mkdir(parents=True, exist_ok=True)
    details = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "student": student,
        "teachers": teachers,
        "runs": {m: [json.loads(r.model_dump_json()) for r in results[m]] for m in args.methods},
        "summary": summary,
    }
    (args.report / "meal_cifar10.json").write_text(json.dumps(details, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
