"""The research's from-scratch experiment on the shared CIFAR-10 JPEGs: Independent, DML and XML.

ResNet34 (net 0) and ResNet18 (net 1), torchvision's, cut after layer2, trained from scratch by each
method with the same data, epochs and optimiser, for several seeds (a seed fixes the training subset,
the initial weights and the data order, so runs of one seed are paired). Every run is evaluated once at
the end (every net, the 2-net ensemble, every stitched path), then diagnosed on 1,000 test images: linear
CKA of the two nets' features at the cut, mean prediction entropy, and top-1 lost under weight noise.

Geometries:

* ``small`` (default; the first bench): 32x32 images (a 4x4 boundary), Adam 1e-3 cosine, crop+flip,
  4,000 training / 2,000 test images, 10 epochs, seeds 0,1.
* ``research`` (the research's terms): CIFAR-10 upsampled to 64x64 (decoded once, cached), ImageNet stem,
  so layer2 hands over 128x8x8; Adam 1e-4 constant; no augmentation (``--augment`` turns crop+flip on);
  8,000 training images, 3 epochs, seeds 0,1,2, the full 10,000-image test set. ~95 min on 2 cores.

``--ablations`` (research geometry; 1,200 training images, 3 epochs, 2,000 test images, seeds 0,1):
XML alternate vs joint schedule, cross_weight 0.5 and 2, all vs single cross paths (three parts: cuts after
layer2 and layer3, where they differ), peer target mean vs ensemble (three nets: ResNet34, ResNet18, ResNet18,
where they differ), each next to DML at the same budget; and semi-supervised DML/XML with 10 % of the labels
next to Independent on the same 10 % (which trains on those images only).

Decision rule, fixed before the runs: method A beats B on a net when the mean over seeds of the paired
difference A - B exceeds twice its standard error (sd / sqrt(seeds)); otherwise no decision.

    python bench/xross_cifar10.py --geometry research           # the main table
    python bench/xross_cifar10.py --geometry research --ablations
    python bench/xross_cifar10.py --subset 500 --epochs 1 --seeds 0   # a quick look

On a GPU: ``--amp bf16 --channels-last [--compile]`` (the run config's fields; all off by default).
Runs are kept in ``--runs``; ``--reuse`` skips a run whose directory already holds its results.
Last line (research): {"geometry", "seeds", "independent": [[m, s], [m, s]], "dml", "xml", "xml_paths_min",
"xml_paths_max", "cka_xml", "cka_dml", "cka_independent", "entropy": {...}, "noise_drop": {...}}
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from xross.analysis.diagnose import NOISE_SCALES, diagnose
from xross.analysis.plots import pyplot, save_png
from xross.analysis.similarity import cohort_cka
from xross.methods.trainer import Trainer
from xross.run.config import TrainConfig
from xross.run.directory import evaluation_batches

ROOT = Path(__file__).resolve().parents[1]
NETS = ["resnet34", "resnet18"]
GEOMETRIES: dict[str, dict[str, Any]] = {
    "small": {"image_size": None, "subset": 4000, "eval_subset": 2000, "epochs": 10, "lr": 1e-3,
              "lr_schedule": "cosine", "augment": True, "seeds": "0,1"},
    "research": {"image_size": 64, "subset": 8000, "eval_subset": None, "epochs": 3, "lr": 1e-4,
                 "lr_schedule": "constant", "augment": False, "seeds": "0,1,2"},
}  # fmt: skip
ABLATION_BUDGET = {"subset": 1200, "eval_subset": 2000, "epochs": 3, "seeds": "0,1"}  # sized for 90 min
MAIN = {"independent": ("independent", {}), "dml": ("dml", {}), "xml": ("xml", {})}
THREE_PARTS = {"cuts": ["layer2", "layer3"]}  # cross single differs from all only from three parts on
THREE_NETS = {"nets": [*NETS, "resnet18"]}  # a peer ensemble differs from the one peer only from three nets on
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "dml": ("dml", {}),
    "xml": ("xml", {}),
    "xml joint": ("xml", {"schedule": "joint"}),
    "xml cross_weight 0.5": ("xml", {"cross_weight": 0.5}),
    "xml cross_weight 2": ("xml", {"cross_weight": 2.0}),
    "xml 3 parts": ("xml", THREE_PARTS),
    "xml 3 parts single": ("xml", {**THREE_PARTS, "cross": "single"}),
    "dml 3 nets": ("dml", THREE_NETS),
    "dml 3 nets ensemble": ("dml", {**THREE_NETS, "peer_target": "ensemble"}),
    "independent 10% labels": ("independent", {"labeled_fraction": 0.1}),
    "dml 10% labels": ("dml", {"labeled_fraction": 0.1}),
    "xml 10% labels": ("xml", {"labeled_fraction": 0.1}),
    # independent training sees only the labelled 10 %: one step per epoch where dml/xml take 18, so
    # also give it the same 54 steps (54 epochs of its 120 images), else it is merely untrained
    "independent 10% labels 54 epochs": ("independent", {"labeled_fraction": 0.1, "epochs": 54}),
}
# each ablation against the variant it changes one thing of (besides DML at the same budget, which all face)
ABLATION_PAIRS = [
    ("xml 3 parts single", "xml 3 parts"), ("dml 3 nets ensemble", "dml 3 nets"),
    *((a, b) for a in ("dml 10% labels", "xml 10% labels")
      for b in ("independent 10% labels", "independent 10% labels 54 epochs")),
    ("xml joint", "xml"), ("xml cross_weight 0.5", "xml"), ("xml cross_weight 2", "xml"),
]  # fmt: skip
DIAGNOSE_IMAGES = 1000  # noise drop: at 0.05, the middle of NOISE_SCALES


def run(name: str, mode: str, options: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant at one seed (or reuse its results), evaluate, diagnose; the run's record."""
    out = args.runs / f"{name.replace(' ', '_').replace('%', 'pct')}-seed{seed}"
    record_file = out / "bench_record.json"
    if args.reuse and record_file.is_file():
        return json.loads(record_file.read_text())
    cfg = TrainConfig(**{
        "mode": mode, "data": args.data, "subset": args.subset, "eval_subset": args.eval_subset,
        "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "adam",
        "lr": args.lr, "lr_schedule": args.lr_schedule, "augment": args.augment, "seed": seed, "eval_every": 0,
        "out": str(out), "nets": NETS, "cuts": ["layer2"], "device": args.device, "amp": args.amp,
        "channels_last": args.channels_last, "compile": args.compile, "threads": args.threads, **options,
    })  # fmt: skip
    start = time.time()
    trainer = Trainer(cfg, force=True, progress=not args.quiet, command=f"bench/xross_cifar10.py {name} seed {seed}")
    result = trainer.fit()
    batches = evaluation_batches(trainer.config, min(DIAGNOSE_IMAGES, args.eval_subset or DIAGNOSE_IMAGES))
    scales = NOISE_SCALES if args.noise else ()
    report = diagnose(trainer.cohort, batches, scales, draws=2, seed=seed)
    cka = cohort_cka(trainer.cohort, [x for x, _ in batches])
    minutes = (time.time() - start) / 60  # training, evaluation and diagnosis
    record = {
        "name": name, "seed": seed, "minutes": round(minutes, 2), "eval": result.model_dump(mode="json"),
        "cka": cka, "entropy": report.entropy, "flatness_scales": report.scales, "flatness_top1": report.top1,
        "noise_drop": report.noise_drop if scales else None, "paths": report.names,
    }  # fmt: skip
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """Mean paired difference a - b, its standard error, and the verdict of the decision rule."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = mean_sd(diffs)
    se = sd / math.sqrt(len(diffs))
    verdict = "no decision" if len(diffs) < 2 or abs(mean) <= 2 * se else ("better" if mean > 0 else "worse")
    return mean, se, verdict


def top1s(records: list[dict[str, Any]], path: list[int]) -> list[float]:
    return [next(p["top1"] for p in r["eval"]["paths"] if list(p["path"]) == path) for r in records]


def own_path(record: dict[str, Any], net: int) -> list[int]:
    return [net] * len(record["eval"]["paths"][0]["path"])


def net_count(record: dict[str, Any]) -> int:
    return 1 + max(max(p["path"]) for p in record["eval"]["paths"])


def summarise(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, console: Console) -> dict[str, Any]:
    seeds = len(next(iter(results.values())))
    nets = [*NETS, "resnet18"][: max(net_count(records[0]) for records in results.values())]
    table = Table(title=f"top-1 %, mean ± sd over {seeds} seeds ({args.geometry} geometry)", title_justify="left")
    columns = ("method", *(f"net {i} {n}" for i, n in enumerate(nets)), "ensemble", "stitched min-max", "CKA@layer2",
               "entropy", "noise drop", "min/run")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right")
    summary: dict[str, Any] = {}
    for method, records in results.items():
        count = net_count(records[0])
        own = [mean_sd(top1s(records, own_path(records[0], i))) for i in range(count)]
        paths = [p["path"] for p in records[0]["eval"]["paths"] if len(set(p["path"])) > 1]
        stitched = [statistics.mean(top1s(records, p)) for p in paths]
        ens = mean_sd([r["eval"]["ensembles"]["nets"]["top1"] for r in records])
        cka = statistics.mean(r["cka"]["b0_0v1"] for r in records)
        entropy = statistics.mean(statistics.mean(r["entropy"]) for r in records)
        drops = [r["noise_drop"] for r in records if r["noise_drop"] is not None]
        drop = statistics.mean(drops) if drops else None
        table.add_row(
            method, *(f"{m:.2f} ± {s:.2f}" for m, s in own), *([""] * (len(nets) - count)),
            f"{ens[0]:.2f} ± {ens[1]:.2f}", f"{min(stitched):.2f}-{max(stitched):.2f}", f"{cka:.3f}",
            f"{entropy:.3f}", f"{drop:.2f}" if drop is not None else "-",
            f"{statistics.mean(r['minutes'] for r in records):.1f}",
        )  # fmt: skip
        summary[method] = {"nets": [[round(m, 2), round(s, 2)] for m, s in own], "ensemble": round(ens[0], 2),
                           "paths_min": round(min(stitched), 2), "paths_max": round(max(stitched), 2),
                           "cka": round(cka, 4), "entropy": round(entropy, 4),
                           "noise_drop": round(drop, 2) if drop is not None else None}  # fmt: skip
        if not args.ablations:
            every = records[0]["eval"]["paths"]
            summary[method]["paths"] = {
                p["name"]: [round(v, 2) for v in mean_sd(top1s(records, p["path"]))] for p in every
            }
    console.print(table)
    if args.ablations:
        pairs = [(a, "dml") for a in results if a != "dml" and "labels" not in a] + ABLATION_PAIRS
    else:
        pairs = [("xml", "dml"), ("xml", "independent"), ("dml", "independent")]
    decisions = Table(
        title="paired differences over seeds (decision: |mean| > 2 standard errors)", title_justify="left"
    )
    for col in ("A vs B", *(f"{n} A-B" for n in NETS), "verdict"):  # nets 0 and 1 are in every variant
        decisions.add_column(col, justify="left" if col == "A vs B" else "right")
    for a, b in pairs:
        diffs = [
            paired(top1s(results[a], own_path(results[a][0], i)), top1s(results[b], own_path(results[b][0], i)))
            for i in range(len(NETS))
        ]
        decisions.add_row(
            f"{a} vs {b}", *(f"{m:+.2f} ± {se:.2f}" for m, se, _ in diffs), " / ".join(v for *_, v in diffs)
        )
        summary[f"{a} vs {b}"] = [[round(m, 2), round(se, 2), v] for m, se, v in diffs]
    console.print(decisions)
    if not args.ablations:
        paths = Table(title="every path (up half > down half), mean ± sd over seeds", title_justify="left")
        for col in ("path", *results):
            paths.add_column(col, justify="left" if col == "path" else "right")
        for name in summary[next(iter(results))]["paths"]:
            paths.add_row(
                name, *(f"{summary[m]['paths'][name][0]:.2f} ± {summary[m]['paths'][name][1]:.2f}" for m in results)
            )
        console.print(paths)
    return summary


def plot_cka(summary: dict[str, Any], methods: list[str], path: Path) -> None:
    """Linear CKA at the cut and top-1 of the stitched paths per method."""
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 1.1 * len(methods)), 3.8 + 0.15 * len(methods)))
    left.bar(methods, [summary[m]["cka"] for m in methods], color=[f"C{k}" for k in range(len(methods))])
    left.set_ylabel("linear CKA, resnet34 vs resnet18 at layer2")
    left.set_ylim(0, 1)
    for k, m in enumerate(methods):
        s = summary[m]
        right.plot(
            [k, k], [s["paths_min"], s["paths_max"]], "o-", color=f"C{k}", label="stitched paths" if k == 0 else None
        )
        right.plot(
            [k - 0.1, k + 0.1], [s["nets"][0][0], s["nets"][1][0]], "s", color="0.3", label="nets" if k == 0 else None
        )
    right.set_xticks(range(len(methods)), methods)
    right.set_ylabel("top-1 (%)")
    right.legend(fontsize=8)
    for ax in (left, right):
        plt.setp(ax.get_xticklabels(), rotation=35 if len(methods) > 4 else 20, ha="right", fontsize=7)
    fig.suptitle("how alike the nets are at the cut, and what their stitched paths score (mean over seeds)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="small")
    ap.add_argument("--ablations", action="store_true", help="the ablation variants (research geometry, smaller)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))
    ap.add_argument("--subset", type=int, help="training images (stratified; default by geometry)")
    ap.add_argument("--eval-subset", type=int, help="test images (default by geometry; research: all 10,000)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None, help="random crop and flip")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds")
    ap.add_argument("--no-noise", dest="noise", action="store_false", help="skip the weight-noise test")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-cifar10", help="run directories")
    ap.add_argument("--reuse", action="store_true", help="keep runs whose directory holds their results")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "results", help="where the JSON and plots go")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="mixed precision (CUDA only)")
    ap.add_argument("--channels-last", action="store_true", help="channels-last memory format (CUDA)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the nets' pieces (CUDA)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.ablations:
        args.geometry = "research"
    defaults = {**GEOMETRIES[args.geometry], **(ABLATION_BUDGET if args.ablations else {})}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.noise = args.noise and not args.ablations
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = ABLATIONS if args.ablations else MAIN
    console = Console(width=200)
    console.print(
        f"{args.geometry} geometry: {args.subset} training images, {args.epochs} epochs, lr {args.lr} "
        f"{args.lr_schedule}, augment {args.augment}, seeds {seeds}, test images {args.eval_subset or 'all'}\n"
        "decision rule (fixed before the runs): A beats B on a net when the mean paired difference over seeds "
        "exceeds twice its standard error"
    )
    start = time.time()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for seed in seeds:
        for name, (mode, options) in variants.items():
            console.print(f"[bold]{name}[/] seed {seed} ({(time.time() - start) / 60:.1f} min so far)")
            results[name].append(run(name, mode, options, seed, args))
    minutes = sum(r["minutes"] for records in results.values() for r in records)  # reused runs count their own time
    summary = summarise(results, args, console)
    tag = (
        "ablations"
        if args.ablations
        else args.geometry + ("-augment" if args.augment and args.geometry == "research" else "")
    )
    args.report.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    detail = {"summary": summary, "minutes": round(minutes, 1), "settings": settings, "runs": results}
    (args.report / f"xross_cifar10_{tag}.json").write_text(json.dumps(detail, indent=1) + "\n")
    plot_cka(summary, list(variants), args.report / f"xross_cifar10_{tag}_cka.png")
    console.print(
        f"total {minutes:.1f} min of runs ({(time.time() - start) / 60:.1f} min now); report in {args.report}"
    )
    if args.ablations:
        line = {"geometry": "research", "ablations": True, "seeds": len(seeds), "minutes": round(minutes, 1)}
        line.update({name: summary[name]["nets"] for name in variants})
    else:
        line = {"geometry": args.geometry, "seeds": len(seeds), "augment": args.augment, "minutes": round(minutes, 1)}
        line.update({m: summary[m]["nets"] for m in MAIN})
        line |= {"xml_paths_min": summary["xml"]["paths_min"], "xml_paths_max": summary["xml"]["paths_max"]}
        line |= {f"cka_{m}": summary[m]["cka"] for m in ("xml", "dml", "independent")}
        line |= {
            "entropy": {m: summary[m]["entropy"] for m in MAIN},
            "noise_drop": {m: summary[m]["noise_drop"] for m in MAIN},
        }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
