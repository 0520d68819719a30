"""Cost of one xross training step per mode, and of the data pipeline alone.

resnet18 + resnet34 cut after layer2, a batch of 64 CIFAR-10 images (32x32) on this
machine's CPU. Seconds per step (median over timed steps, after warm-up) of
independent, dml, xml computing every path from scratch ("naive") and xml sharing
path prefixes ("shared"); FLOPs of each step (forward + backward) from
torch.utils.flop_counter; augmented images/s of the loader alone. Then the xml step (both
schedules) on 2 processes under ``torchrun`` (gloo, one thread each, 32 images per rank) with each
``--parallel`` engine: DDP and FSDP2 against the hand-written flat all-reduce (``manual``), the
slowest rank's median step.

    python bench/xross_cost.py [--steps 10] [--data ../shared/data/cifar10-jpeg.tar.xz] [--no-parallel]

Last line: {"dml_s", "xml_naive_s", "xml_shared_s", "flop_ratio_xml_over_dml",
"time_ratio_xml_over_dml", "naive_over_shared", "loader_images_per_s", "parallel": {SCHEDULE: {ENGINE: s}},
"ddp_over_manual", "fsdp_over_manual"} (the ratios: the alternate schedule's)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
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


def measure(cfg: TrainConfig, steps: int, flops: bool = True) -> tuple[float, int]:
    """(median seconds per step, FLOPs of one step, 0 unless ``flops``) of the real Trainer.train_step."""
    trainer = Trainer(cfg, force=True, progress=False)
    images, labels = next(iter(trainer.train_loader.epoch(0)))
    for _ in range(2):  # warm-up
        trainer.train_step(images, labels)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step(images, labels)
        times.append(time.perf_counter() - t)
    if not flops:
        return statistics.median(times), 0
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(images, labels)
    return statistics.median(times), int(counter.get_total_flops())


ENGINES = ("manual", "ddp", "fsdp")
SCHEDULES = ("alternate", "joint")


def base_config(args: argparse.Namespace, tmp: str) -> dict:
    return dict(
        nets=["resnet18", "resnet34"],
        cuts=["layer2"],
        data=args.data,
        subset=640,
        eval_subset=10,
        batch_size=args.batch_size,
        epochs=1,
        out=f"{tmp}/run",
    )


def rank_worker(args: argparse.Namespace) -> None:
    """Under torchrun: the median xml step with ``--parallel args.worker`` (each schedule), written by rank 0."""
    torch.set_num_threads(1)
    out = {}
    tmp = str(Path(args.result).parent)  # the same run directory on every rank
    for schedule in SCHEDULES:
        cfg = TrainConfig(**base_config(args, tmp), mode="xml", schedule=schedule, parallel=args.worker)
        seconds, _ = measure(cfg, args.steps, flops=False)
        slowest = torch.tensor([seconds])
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        out[schedule] = float(slowest)
    if torch.distributed.get_rank() == 0:
        Path(args.result).write_text(json.dumps(out))


def measure_parallel(args: argparse.Namespace, console: Console) -> dict[str, dict[str, float]]:
    """{schedule: {engine: seconds per step}} of 2 processes, one torchrun per engine."""
    results: dict[str, dict[str, float]] = {s: {} for s in SCHEDULES}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ENGINES:
            console.print(f"measuring xml on 2 processes, --parallel {engine} ...")
            result = Path(tmp) / f"{engine}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            command += [__file__, "--worker", engine, "--result", str(result), "--data", args.data]
            command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:  # the ranks' own error line, not torchrun's banner around it
                lines = [line for line in done.stderr.splitlines() if re.search(r"^error:|\w(Error|Exception):", line)]
                console.print(f"  failed: {(lines or done.stderr.strip().splitlines() or ['?'])[0][:300]}")
                continue
            for schedule, seconds in json.loads(result.read_text()).items():
                results[schedule][engine] = seconds
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-parallel", action="store_true", help="skip the 2-process engines")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return rank_worker(args)
    console = Console()
    results: dict[str, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = base_config(args, tmp)
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
    parallel = {} if args.no_parallel else measure_parallel(args, console)
    if parallel:
        title = "xml on 2 processes (gloo, 1 thread each): s/step of the slowest rank"
        table = Table(title=title, title_justify="left")
        for col in ("schedule", *ENGINES, "ddp / manual", "fsdp / manual"):
            table.add_column(col, justify="right" if col != "schedule" else "left")
        for schedule, row in parallel.items():
            ratios = [f"{row[e] / row['manual']:.2f}" if e in row and "manual" in row else "-" for e in ("ddp", "fsdp")]
            table.add_row(schedule, *(f"{row[e]:.3f}" if e in row else "failed" for e in ENGINES), *ratios)
        console.print(table)
    alternate = parallel.get("alternate", {})
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
                "parallel": {k: {e: round(v, 4) for e, v in row.items()} for k, row in parallel.items()},
                **{
                    f"{e}_over_manual": round(alternate[e] / alternate["manual"], 3)
                    for e in ("ddp", "fsdp")
                    if e in alternate and "manual" in alternate
                },
            }
        )
    )


if __name__ == "__main__":
    main()
