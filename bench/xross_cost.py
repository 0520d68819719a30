"""Cost of one xross training step per mode, and of the data pipeline alone.

resnet18 + resnet34 cut after layer2, a batch of 64 CIFAR-10 images (32x32) on this
machine's CPU. Seconds per step (median over timed steps, after warm-up) of
independent, dml, xml computing every path from scratch ("naive") and xml sharing
path prefixes ("shared"); FLOPs of each step (forward + backward) from
torch.utils.flop_counter; augmented images/s of the loader alone.

    python bench/xross_cost.py [--steps 10] [--data ../shared/data/cifar10-jpeg.tar.xz]

Last line: {"dml_s", "xml_naive_s", "xml_shared_s", "flop_ratio_xml_over_dml",
"time_ratio_xml_over_dml", "naive_over_shared", "loader_images_per_s"}
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from xross.data import load_split, loader_throughput
from xross.methods.trainer import Trainer
from xross.run.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> config overrides
    "independent": {"mode": "independent"},
    "dml": {"mode": "dml"},
    "xml_naive": {"mode": "xml", "shared_prefixes": False},
    "xml_shared": {"mode": "xml"},
}


def measure(cfg: TrainConfig, steps: int) -> tuple[float, int]:
    """(median seconds per step, FLOPs of one step) of the real Trainer.train_step."""
    trainer = Trainer(cfg, force=True, progress=False)
    images, labels = next(iter(trainer.train_loader.epoch(0)))
    for _ in range(2):  # warm-up
        trainer.train_step(images, labels)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step(images, labels)
        times.append(time.perf_counter() - t)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(images, labels)
    return statistics.median(times), int(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    console = Console()
    results: dict[str, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(
            nets=["resnet18", "resnet34"],
            cuts=["layer2"],
            data=args.data,
            subset=640,
            eval_subset=10,
            batch_size=args.batch_size,
            epochs=1,
            out=f"{tmp}/run",
        )
        for name, over in VARIANTS.items():
            console.print(f"measuring {name} ...")
            results[name] = measure(TrainConfig(**{**base, **over}), args.steps)
    loader_ips = loader_throughput(
        load_split(args.data, "train", subset=640, progress=False), args.batch_size, steps=100
    )
    table = Table(
        title=f"xross step cost, batch {args.batch_size} of 32x32, {torch.get_num_threads()} CPU threads",
        title_justify="left",
    )
    for col in ("variant", "s/step", "images/s", "GFLOPs/step", "time vs dml", "FLOPs vs dml"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    dml_s, dml_f = results["dml"]
    for name, (s, f) in results.items():
        table.add_row(
            name, f"{s:.3f}", f"{args.batch_size / s:.0f}", f"{f / 1e9:.1f}", f"{s / dml_s:.2f}", f"{f / dml_f:.2f}"
        )
    console.print(table)
    cheapest_ips = args.batch_size / min(s for s, _ in results.values())
    console.print(
        f"data pipeline alone: {loader_ips:,.0f} images/s = {loader_ips / cheapest_ips:.0f}x the cheapest training mode"
    )
    xml_s, xml_f = results["xml_shared"]
    print(
        json.dumps(
            {
                "dml_s": round(dml_s, 4),
                "xml_naive_s": round(results["xml_naive"][0], 4),
                "xml_shared_s": round(xml_s, 4),
                "flop_ratio_xml_over_dml": round(xml_f / dml_f, 3),
                "time_ratio_xml_over_dml": round(xml_s / dml_s, 3),
                "naive_over_shared": round(results["xml_naive"][0] / xml_s, 3),
                "loader_images_per_s": round(loader_ips),
            }
        )
    )


if __name__ == "__main__":
    main()
