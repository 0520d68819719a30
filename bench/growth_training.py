"""Grow while training on the shared CIFAR-10 JPEGs (issue 27): what growing saves against training from scratch.

Every variant is one net trained by ``xross.train`` (mode ``independent``: a cohort of one net, cut once, the
cheapest valid config; the cut does nothing for one net) for THE SAME number of steps: SGD momentum 0.9,
lr 0.05, weight decay 5e-4, cosine schedule, batch 64, crop+flip, 32x32 images, evaluated every epoch on a
stratified test subset. A seed fixes the training subset, the initial weights and the data order.

Settings (a grown run against its from-scratch target; CPU-sized, so the ResNets are at a quarter of
torchvision's width: "ResNet-18" here is ``growth.models:resnet(width=16)``, its half width ``width=8``):

* ``wider25`` / ``wider50``: ResNet-18 at half width grown to full width (``net2wider:all:factor=2``) at 25 %
  / 50 % of the steps, against ResNet-18 from scratch;
* ``deeper25``: ResNet-10 (one BasicBlock per stage) grown to ResNet-18's shape at 25 % by
  ``net2deeper:stages`` (a zero-branch copy of ``layer1.0``; a new zero-branch residual block after each
  downsampling ``layer2.0``..``layer4.0``, growth's ``kind="residual"``), against ResNet-18 from scratch;
* ``vgg_dw`` / ``vgg_wd``: the growth notes' VGG-8 (``growth.models:vgg8(width=8, hidden=64)``) grown
  deeper (``net2deeper:stages``, an identity conv per stage) at 25 % then wider (x2, every group) at
  50 %, and in the other order; the target is the grown shape (deeper-then-wider, which has the same
  parameter shapes as wider-then-deeper: checked) re-initialised;
* ablations on ``wider25``: ``--grow-optimizer reset`` (``wider25_reset``) and ``--grow-init random``
  (``wider25_random``).

A re-initialised target is the grown model (``growth.grow_steps``) with every module's ``reset_parameters``
(PyTorch's default init, as the builders use), seeded, saved with ``surgery.save`` and trained by reference.

Headline (bert2BERT's): the fraction of the from-scratch run's training FLOPs (xross's counter: 3x the
forward FLOPs per image, summed over steps) at which the grown run first reaches the from-scratch run's
final test top-1, linearly interpolated on the per-epoch eval curve (from chance at 0 FLOPs); ``null``
("never") when it never does, and "n/a" when the from-scratch run ends at chance (nothing to reach). A
setting's ``compute_saved`` is 1 - the mean fraction when every seed reaches the target, else ``null`` (the
per-seed fractions are in ``fraction``). ``minutes``: the runs' own wall times summed (a reused run counts
its own).

    python -u bench/growth_training.py --quick    # a smoke run of both settings, ~3 min idle
    python -u bench/growth_training.py            # both: CNN (800 images x 4 epochs, 1000 test, seeds 0,1), LM
    python -u bench/growth_training.py --cnn      # the CNN setting only
    python -u bench/growth_training.py --lm       # the language-model setting only (bench/growth_training_lm.py)

The language-model setting (``--lm``: GPT-2 and LLaMA on the stdlib's bytes, grown wider / deeper at 25 % by
``growth.grow_transformer``) is described in ``bench/growth_training_lm.py``; its full run is ~40 min on 2
idle cores, its ``--quick`` (40 steps, seed 0) ~2 min.

The default took 21.4 min on 2 cores shared with other jobs (seed 0 at ~30 images/s under load 6, seed 1
at ~500 images/s on the then idle machine, ~4 min for its 10 runs): scale ``--subset``/``--epochs`` up when
the machine is idle.

Last line: {"cnn_compute_saved", "cnn_best_setting", "cnn_settings": {setting: {...}}, "carry_vs_reset",
"copy_vs_random", "minutes"} when the CNN ran, plus {"lm_compute_saved", "lm_best_setting", "lm_settings":
{"gpt2_wider": {"compute_saved", "fraction", ...}, ...}, "lm_minutes"} when the LM ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import growth_training_lm as lm
import torch
from rich.console import Console
from rich.table import Table

import growth
import surgery
import xross
from xross.analysis.plots import pyplot, save_png
from xross.run.growing import parse_item

ROOT = Path(__file__).resolve().parents[1]
R18, R18_HALF = "growth.models:resnet(width=16)", "growth.models:resnet(width=8)"
R10_REF = "growth.models:resnet(layers=[1, 1, 1, 1], width=16)"
VGG = "growth.models:vgg8(width=8, hidden=64)"
VGG_DW = ["0.25:net2deeper:stages", "0.5:net2wider:all:factor=2"]
VGG_WD = ["0.25:net2wider:all:factor=2", "0.5:net2deeper:stages"]
CHANCE = 10.0  # top-1 % of a 10-class guess: the curve's point at 0 FLOPs


@dataclass(frozen=True)
class Variant:
    """One training run of the bench: a net reference (or a grown shape to re-initialise) and its options."""

    name: str
    net: str
    cut: str
    grow: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    target_of: list[str] | None = None  # a from-scratch target: the shape ``net`` grows to under these items


VARIANTS = [
    Variant("resnet18", R18, "layer2"),
    Variant("wider25", R18_HALF, "layer2", ["0.25:net2wider:all:factor=2"]),
    Variant("wider50", R18_HALF, "layer2", ["0.5:net2wider:all:factor=2"]),
    Variant("wider25_reset", R18_HALF, "layer2", ["0.25:net2wider:all:factor=2"], {"grow_optimizer": "reset"}),
    Variant("wider25_random", R18_HALF, "layer2", ["0.25:net2wider:all:factor=2"], {"grow_init": "random"}),
    Variant("deeper25", R10_REF, "layer2", ["0.25:net2deeper:stages"]),
    Variant("vgg_target", VGG, "features.1", target_of=VGG_DW),
    Variant("vgg_dw", VGG, "features.1", VGG_DW),
    Variant("vgg_wd", VGG, "features.1", VGG_WD),
]
# setting -> (grown variant, from-scratch variant)
SETTINGS = {
    "wider25": ("wider25", "resnet18"),
    "wider50": ("wider50", "resnet18"),
    "deeper25": ("deeper25", "resnet18"),
    "vgg_deeper_then_wider": ("vgg_dw", "vgg_target"),
    "vgg_wider_then_deeper": ("vgg_wd", "vgg_target"),
    "wider25_reset": ("wider25_reset", "resnet18"),
    "wider25_random": ("wider25_random", "resnet18"),
}


def grown_shape(net: str, items: list[str]) -> torch.nn.Module:
    """The model ``net`` becomes under the schedule ``items`` (applied in order, as a run applies them)."""
    model = surgery.refs.load(net, num_classes=10).eval()
    example = torch.randn(2, 3, 32, 32)
    for text in items:
        item = parse_item(text)
        steps = growth.expand(model, item.op, item.sites, seed=0, example_input=example, **item.args)
        model = growth.grow_steps(model, steps, example).eval()
    return model


def shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in model.parameters())


def target_reference(variant: Variant, seed: int, root: Path) -> str:
    """Save the grown shape of ``variant`` with fresh weights (seeded) and return its directory as a reference."""
    assert variant.target_of is not None
    model = grown_shape(variant.net, variant.target_of)
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if module is not model and callable(reset):
            reset()
    out = root / f"{variant.name}-seed{seed}-init"
    surgery.save(model, out, force=True)
    return str(out)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run(variant: Variant, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant at one seed (or reuse its record); its curve, FLOPs, params and wall time."""
    out = args.out / "runs" / f"{variant.name}-seed{seed}"
    record_file = out / "bench_record.json"
    if args.reuse and record_file.is_file():
        return dict(json.loads(record_file.read_text()))
    net = target_reference(variant, seed, args.out / "runs") if variant.target_of else variant.net
    config = xross.TrainConfig(
        mode="independent", nets=[net], cuts=[variant.cut], data=args.data, subset=args.subset,
        eval_subset=args.eval_subset, image_size=32, epochs=args.epochs, batch_size=args.batch_size,
        optimizer="sgd", lr=args.lr, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine", augment=True,
        seed=seed, eval_every=1, threads=args.threads, out=str(out), grow=variant.grow, **variant.options,
    )  # fmt: skip
    start = time.time()
    result = xross.train(config, force=True, progress=False)
    wall = time.time() - start
    epochs = read_csv(out / "epochs.csv")
    growths = [json.loads(line) for line in (out / "growth.jsonl").read_text().splitlines()] if variant.grow else []
    at = [float(s["train_flops"]) for s in read_csv(out / "steps.csv") if s.get("grow_loss_before0")]
    record = {
        "variant": variant.name, "seed": seed, "wall_s": round(wall, 1),
        "flops": [float(e["train_flops"]) for e in epochs], "top1": [float(e["top1_net0"]) for e in epochs],
        "final_top1": result.paths[0].top1, "params_after": result.paths[0].params,
        "params_before": growths[0]["params_before"] if growths else result.paths[0].params,
        "growths": [{k: g[k] for k in ("item", "global_step", "loss_before", "loss_after", "max_logit_change")}
                    for g in growths],
        "growth_flops": at,
    }  # fmt: skip
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return record


def flops_to_reach(record: dict[str, Any], target: float) -> float | None:
    """Training FLOPs at which ``record``'s eval curve first reaches ``target`` top-1 (linear between evals)."""
    points = [(0.0, CHANCE), *zip(record["flops"], record["top1"])]
    for (f0, a0), (f1, a1) in zip(points, points[1:]):
        if a1 >= target:
            return f1 if a1 == a0 else f0 + (f1 - f0) * (target - a0) / (a1 - a0)
    return None


def mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.mean(known), 4) if known else None


def summarise(records: dict[str, list[dict[str, Any]]], console: Console) -> dict[str, dict[str, Any]]:
    """The table (every run) and each setting's fraction of scratch FLOPs to reach scratch's final top-1."""
    table = Table(title="grow while training: every run", title_justify="left")
    columns = ("setting", "variant", "seed", "params before", "params after", "final top-1", "train TFLOPs",
               "wall s", "fraction of scratch FLOPs")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("setting", "variant") else "right")
    settings: dict[str, dict[str, Any]] = {}
    shown: set[str] = set()
    for setting, (grown, scratch) in SETTINGS.items():
        fractions: list[float | None] = []
        untrained = [s["final_top1"] <= CHANCE for s in records[scratch]]
        for g, s in zip(records[grown], records[scratch]):
            reach = None if s["final_top1"] <= CHANCE else flops_to_reach(g, s["final_top1"])
            fractions.append(None if reach is None else round(reach / s["flops"][-1], 4))
        for name, rows, marks in ((scratch, records[scratch], None), (grown, records[grown], fractions)):
            if name in shown:
                continue
            shown.add(name)
            for k, r in enumerate(rows):
                frac = "" if marks is None else f"{marks[k]:.3f}" if marks[k] is not None else "never"
                frac = "n/a" if marks is not None and untrained[k] else frac
                table.add_row(
                    setting, name, str(r["seed"]), f"{r['params_before']:,}", f"{r['params_after']:,}",
                    f"{r['final_top1']:.2f}", f"{r['flops'][-1] / 1e12:.2f}", f"{r['wall_s']:.0f}", frac,
                )  # fmt: skip
        frac_mean = mean(fractions)
        settings[setting] = {
            "grown": grown, "scratch": scratch, "fraction": fractions, "fraction_mean": frac_mean,
            "compute_saved": None if frac_mean is None or None in fractions else round(1 - frac_mean, 4),
            "top1_grown": [r["final_top1"] for r in records[grown]],
            "top1_scratch": [r["final_top1"] for r in records[scratch]],
            "flops_ratio": round(records[grown][0]["flops"][-1] / records[scratch][0]["flops"][-1], 4),
        }  # fmt: skip
    console.print(table)
    return settings


def difference(records: dict[str, list[dict[str, Any]]], a: str, b: str) -> float:
    """Mean over seeds of final top-1 of ``a`` minus ``b``."""
    return round(statistics.mean(x["final_top1"] - y["final_top1"] for x, y in zip(records[a], records[b])), 3)


def plot_setting(setting: str, grown: str, scratch: str, records: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Top-1 against cumulative training FLOPs, grown and from scratch, every seed; dotted: the first logged
    step after each growth (seed 0)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for colour, name in (("C0", grown), ("C1", scratch)):
        for k, r in enumerate(records[name]):
            style = "-" if k == 0 else "--"
            ax.plot([0, *(f / 1e12 for f in r["flops"])], [CHANCE, *r["top1"]], style, marker="o", ms=3,
                    color=colour, label=f"{name} seed {r['seed']}")  # fmt: skip
        for flops in records[name][0]["growth_flops"]:
            ax.axvline(flops / 1e12, color=colour, lw=0.6, ls=":")
    ax.set_xlabel("cumulative training FLOPs (10^12; 3x forward per image)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{setting}: {grown} vs {scratch} from scratch", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def check_shapes() -> None:
    """Deeper-then-wider and wider-then-deeper end in the same parameter shapes (they share one target), and
    ResNet-10 grown by ``stages`` in ResNet-18's (its target)."""
    if shapes(grown_shape(VGG, VGG_DW)) != shapes(grown_shape(VGG, VGG_WD)):
        raise SystemExit("the two VGG growth orders end in different shapes: give each its own target")
    if shapes(grown_shape(R10_REF, ["0.25:net2deeper:stages"])) != shapes(surgery.refs.load(R18, num_classes=10)):
        raise SystemExit("ResNet-10 grown by net2deeper:stages is not ResNet-18's shape")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))
    ap.add_argument("--subset", type=int, default=800, help="training images (stratified)")
    ap.add_argument("--eval-subset", type=int, default=1000, help="test images (stratified)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs (the same for every variant: the same steps)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-growth-training", help="runs, plots, JSON")
    ap.add_argument(
        "--reuse", action="store_true", help="keep runs whose record is there (CNN: its run directory; LM: OUT/lm/runs)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 images, 1 epoch, 100 test, seed 0; "
                    "LM: 40 steps, 16 held-out windows")  # fmt: skip
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--cnn", action="store_true", help="the CNN setting only (default: CNN and LM)")
    which.add_argument("--lm", action="store_true", help="the language-model setting only (default: CNN and LM)")
    lm.add_arguments(ap)
    args = ap.parse_args()
    lm_only = {"lm_steps", "lm_batch", "lm_seq", "lm_lr", "lm_eval"}
    cnn_only = {"data", "subset", "eval_subset", "epochs", "batch_size", "lr"}
    for flag, other in (("--cnn", lm_only), ("--lm", cnn_only)):
        moved = sorted(k for k in other if getattr(args, flag[2:]) and getattr(args, k) != ap.get_default(k))
        if moved:
            ap.error(f"{', '.join('--' + k.replace('_', '-') for k in moved)} does not apply with {flag}: drop it")
    sized = sorted(k for k in (*lm_only - {"lm_lr"}, "subset", "epochs", "eval_subset", "seeds")
                   if args.quick and getattr(args, k) != ap.get_default(k))  # fmt: skip
    if sized:
        ap.error(f"--quick sets {', '.join('--' + k.replace('_', '-') for k in sized)} itself: drop one or the other")
    if args.quick:
        args.subset, args.epochs, args.eval_subset, args.seeds = 200, 1, 100, "0"
        lm.quick(args)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers (e.g. 0,1), not {args.seeds!r}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=200)
    line: dict[str, Any] = {} if args.lm else run_cnn(args, console)
    if not args.cnn:
        line |= lm.run_lm(args, args.seed_list, console)
    print(json.dumps(line), flush=True)


def run_cnn(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Every CNN run; the table, one plot per setting, and the last line's CNN keys."""
    seeds = args.seed_list
    print(
        f"grow while training: {args.subset} training images, {args.epochs} epochs, batch {args.batch_size}, "
        f"SGD lr {args.lr} cosine, {args.eval_subset} test images, seeds {seeds}, {len(VARIANTS)} variants",
        flush=True,
    )
    check_shapes()
    start = time.time()
    records: dict[str, list[dict[str, Any]]] = {v.name: [] for v in VARIANTS}
    for seed in seeds:
        for variant in VARIANTS:
            print(f"{variant.name} seed {seed} ({(time.time() - start) / 60:.1f} min so far)", flush=True)
            r = run(variant, seed, args)
            records[variant.name].append(r)
            grown = "; ".join(f"{g['item']} at step {g['global_step']}: loss {g['loss_before']['0']:.5f} -> "
                              f"{g['loss_after']['0']:.5f}" for g in r["growths"])  # fmt: skip
            print(f"  top-1 {r['final_top1']:.2f}, {r['flops'][-1] / 1e12:.2f} TFLOPs, {r['wall_s']:.0f} s"
                  + (f"; {grown}" if grown else ""), flush=True)  # fmt: skip
    minutes = round(sum(r["wall_s"] for rs in records.values() for r in rs) / 60, 1)
    settings = summarise(records, console)
    for setting, s in settings.items():
        plot_setting(setting, s["grown"], s["scratch"], records, args.out / f"{setting}.png")
    saved = {k: v["compute_saved"] for k, v in settings.items() if v["compute_saved"] is not None}
    best = max(saved, key=lambda k: saved[k]) if saved else None
    line = {
        "cnn_compute_saved": saved[best] if best else None, "cnn_best_setting": best,
        "cnn_settings": {k: {"compute_saved": v["compute_saved"], "fraction": v["fraction"],
                             "top1_grown": v["top1_grown"], "top1_scratch": v["top1_scratch"]}
                         for k, v in settings.items()},
        "carry_vs_reset": difference(records, "wider25", "wider25_reset"),
        "copy_vs_random": difference(records, "wider25", "wider25_random"),
        "minutes": minutes,
    }  # fmt: skip
    detail = {"settings": settings, "args": {k: str(v) for k, v in vars(args).items()}, "runs": records}
    (args.out / "growth_training.json").write_text(json.dumps(detail, indent=1) + "\n")
    print(
        f"runs {minutes} min ({(time.time() - start) / 60:.1f} min now); runs, plots and JSON in {args.out}", flush=True
    )
    return line


if __name__ == "__main__":
    main()
