"""Throughput of a real xross DML and XML training step on one GPU, against the FLOP roofline and a hand-written step.

Part A of ``bench/gpu.sh``. resnet18 + resnet34 cut after layer2 (``bench/xross_cost.py``'s cohort), one batch
of 32x32 CIFAR-10 images (the archive in ``.gpu-data/`` if there, else a generated stand-in), timed through the
real :meth:`xross.methods.trainer.Trainer.train_step`:

* ``fast``: ``amp="bf16"``, ``channels_last``, ``compile`` (CUDA); ``eager``: fp32, no compile (what the
  switches buy).
* FLOPs of one step (forward + backward) from ``torch.utils.flop_counter`` on the eager step; achieved
  TFLOP/s = FLOPs / median seconds, against the bf16 dense matmul peak measured here (8192^3 ``torch.mm``)
  and the spec figure ``--peak-tflops`` (989: H100/H200 SXM dense bf16).
* the hand-written twin of the DML step: the same two torchvision resnets, two forwards, ``0.5 CE + 0.5 KL``
  to the detached peer, one summed backward (the peer is detached, so each net gets exactly its own loss's
  gradient, as under our ``alternate`` schedule), Adam; the same batch and switches. XML has no simple twin:
  its TFLOP/s and its time over DML's.

Every figure is the median over ``--steps`` timed steps after warm-up (compilation) steps, CUDA synchronised
around each. Each measurement is written to ``--out`` as soon as it is done, so a run stopped by a timeout
keeps what it finished; ``--budget-s`` skips what would start after that many seconds.

    python bench/gpu_step.py --out a.json                        # on the GPU
    python bench/gpu_step.py --device cpu --quick --out a.json   # the plumbing, on CPU in a minute
    python bench/gpu_step.py --part parallel --out b.json        # part B: pipeline and fsdp on one process

Last line: one JSON object (also in ``--out``).
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
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / ".gpu-data" / "cifar10-jpeg.tar.xz"
NETS = ["resnet18", "resnet34"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of ``step`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def count_flops(step: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, quick: bool) -> float:
    """Dense matmul TFLOP/s: 8192^3 bf16 on CUDA (mean of 10 after 3 warm-ups); 512^3 fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    reps = 2 if quick else 10
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def data_archive(tmp: str, quick: bool) -> str:
    if ARCHIVE.is_file():
        return str(ARCHIVE)
    from xross.data.synthetic import pack_archive, write_synthetic

    folder = write_synthetic(Path(tmp) / "cifar10-synthetic", train_per_class=20 if quick else 110, test_per_class=2)
    return str(pack_archive(folder, Path(tmp) / "cifar10-synthetic.tar.xz"))


def ours(
    mode: str, fast: bool, args: argparse.Namespace, data: str, tmp: str, flops: bool
) -> tuple[float, int, tuple[torch.Tensor, torch.Tensor]]:
    """(median s/step, FLOPs or 0, the batch) of Trainer.train_step, as bench/xross_cost.py's measure()."""
    from xross.methods.trainer import Trainer
    from xross.run.config import TrainConfig

    switches: dict[str, Any] = {"amp": "bf16", "channels_last": True, "compile": True} if fast else {}
    cfg = TrainConfig(
        nets=NETS, cuts=["layer2"], mode=mode, data=data, subset=max(640, 2 * args.batch), eval_subset=10,
        batch_size=args.batch, epochs=1, out=f"{tmp}/run-{mode}-{fast}", cache_dir=f"{tmp}/cache",
        device=args.device, **switches,
    )  # fmt: skip
    trainer = Trainer(cfg, force=True, progress=False)
    images, labels = next(iter(trainer.train_loader.epoch(0)))
    device = trainer.device
    seconds = timed(lambda: trainer.train_step(images, labels), device, args.warmup_fast if fast else 2, args.steps)
    count = count_flops(lambda: trainer.train_step(images, labels)) if flops else 0
    return seconds, count, (images, labels)


def hand_dml(
    fast: bool, args: argparse.Namespace, batch: tuple[torch.Tensor, torch.Tensor], flops: bool
) -> tuple[float, int]:
    """(median s/step, FLOPs or 0) of a DML step written directly in PyTorch."""
    import torchvision

    device = batch[0].device  # where our Trainer put it
    cuda_fast = fast and device.type == "cuda"  # as the Trainer: the switches apply on CUDA only
    torch.manual_seed(0)
    nets = [getattr(torchvision.models, name)(num_classes=10).to(device) for name in NETS]
    if cuda_fast:
        nets = [net.to(memory_format=torch.channels_last) for net in nets]
    models = [torch.compile(net) if cuda_fast else net for net in nets]
    optimizer = torch.optim.Adam([p for net in nets for p in net.parameters()], lr=1e-4)
    images, labels = batch[0].to(device).float(), batch[1].to(device)
    if cuda_fast:
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda_fast):
            logits = [model(images).float() for model in models]
        loss = logits[0].new_zeros(())
        for i, own in enumerate(logits):
            peer = F.log_softmax(logits[1 - i].detach(), dim=1)
            kl = F.kl_div(F.log_softmax(own, dim=1), peer, reduction="batchmean", log_target=True)
            loss = loss + 0.5 * F.cross_entropy(own, labels) + 0.5 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(step, device, args.warmup_fast if cuda_fast else 2, args.steps)
    return seconds, count_flops(step) if flops else 0


class Results:
    """The part's JSON, rewritten to ``path`` after every measurement."""

    def __init__(self, path: Path | None, base: dict[str, Any]):
        self.path, self.data = path, base
        self.data.setdefault("errors", {})
        self.save()

    def save(self) -> None:
        if self.path:
            self.path.write_text(json.dumps(self.data) + "\n")

    def attempt(self, name: str, start: float, budget: float, fn: Callable[[], None], console: Console) -> None:
        if time.time() - start > budget:
            self.data["errors"][name] = f"skipped: past the {budget:.0f} s budget"
        else:
            console.print(f"[{time.time() - start:5.0f} s] {name} ...")
            try:
                fn()
            except Exception as error:  # a failure of one measurement is a figure of the report, not the end
                traceback.print_exc()
                self.data["errors"][name] = f"{type(error).__name__}: {str(error).strip().splitlines()[:1]}"
        self.save()


def part_step(args: argparse.Namespace) -> dict[str, Any]:
    start = time.time()
    console = Console(width=160, stderr=True)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    res = Results(
        args.out,
        {
            "part": "step", "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "batch": args.batch, "image": 32, "steps": args.steps, "nets": NETS, "cut": "layer2",
            "fast": "bf16 + channels_last + compile" if cuda else "cpu: the switches do nothing",
            "spec_peak_tflops": args.peak_tflops,
            "eager": "fp32, no compile (cuDNN may use TF32 in convolutions: torch's default)",
        },
    )  # fmt: skip
    d = res.data
    d["data"] = "cifar10 archive" if ARCHIVE.is_file() else "synthetic"
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def peak() -> None:
        d["matmul_peak_tflops"] = round(matmul_peak(device, args.quick), 1)

    def run_ours(mode: str, fast: bool) -> Callable[[], None]:
        def go() -> None:
            s, f, batch = ours(mode, fast, args, data, tmp, flops=not fast)
            d[f"ours_{mode}_{'fast' if fast else 'eager'}_s"] = round(s, 5)
            if f:
                d[f"flops_{mode}"] = f
            batches.setdefault("batch", batch)

        return go

    def run_hand(fast: bool) -> Callable[[], None]:
        def go() -> None:
            if "batch" not in batches:
                raise RuntimeError("no batch: our DML step did not run")
            s, f = hand_dml(fast, args, batches["batch"], flops=not fast)
            d[f"hand_dml_{'fast' if fast else 'eager'}_s"] = round(s, 5)
            if f:
                d["flops_hand_dml"] = f

        return go

    with tempfile.TemporaryDirectory() as tmp:
        data = data_archive(tmp, args.quick)
        # the eager ones first: quick, and they give the FLOPs; then the compiled ones, most wanted first
        res.attempt("matmul peak", start, args.budget_s, peak, console)
        res.attempt("ours dml eager", start, args.budget_s, run_ours("dml", False), console)
        res.attempt("ours xml eager", start, args.budget_s, run_ours("xml", False), console)
        res.attempt("hand dml eager", start, args.budget_s, run_hand(False), console)
        if not args.eager_only:
            res.attempt("ours dml fast", start, args.budget_s, run_ours("dml", True), console)
            res.attempt("hand dml fast", start, args.budget_s, run_hand(True), console)
            res.attempt("ours xml fast", start, args.budget_s, run_ours("xml", True), console)
    derive(d)
    d["seconds"] = round(time.time() - start, 1)
    res.save()
    table = Table(title=f"one training step, batch {args.batch} of 32x32 on {d['device']}", title_justify="left")
    columns = ("step", "eager fp32 ms", "fast ms", "images/s (fast)", "TFLOP/s (fast)", "of measured peak", "of spec")
    for col in columns:
        table.add_column(col, justify="left" if col == "step" else "right")
    for name in ("ours_dml", "hand_dml", "ours_xml"):
        eager, fast = d.get(f"{name}_eager_s"), d.get(f"{name}_fast_s")
        table.add_row(
            name.replace("_", " "),
            f"{eager * 1e3:.1f}" if eager else "-",
            f"{fast * 1e3:.1f}" if fast else "-",
            f"{args.batch / fast:,.0f}" if fast else "-",
            f"{d[f'tflops_{name}_fast']:.1f}" if f"tflops_{name}_fast" in d else "-",
            f"{d[f'peak_fraction_{name}_fast']:.1%}" if f"peak_fraction_{name}_fast" in d else "-",
            f"{d[f'spec_fraction_{name}_fast']:.1%}" if f"spec_fraction_{name}_fast" in d else "-",
        )
    console.print(table)
    return d


def derive(d: dict[str, Any]) -> None:
    """TFLOP/s, roofline fractions and the ratios, from what was measured."""
    for name, flops in (("ours_dml", "flops_dml"), ("hand_dml", "flops_hand_dml"), ("ours_xml", "flops_xml")):
        for kind in ("eager", "fast"):
            s = d.get(f"{name}_{kind}_s")
            if s:
                d[f"images_per_s_{name}_{kind}"] = round(d["batch"] / s, 1)
            if s and d.get(flops):
                tflops = d[flops] / s / 1e12
                d[f"tflops_{name}_{kind}"] = round(tflops, 3)
                if d.get("matmul_peak_tflops"):
                    d[f"peak_fraction_{name}_{kind}"] = round(tflops / d["matmul_peak_tflops"], 4)
                d[f"spec_fraction_{name}_{kind}"] = round(tflops / d["spec_peak_tflops"], 4)
    for kind in ("eager", "fast"):
        ours_dml, hand, xml = (d.get(f"{n}_{kind}_s") for n in ("ours_dml", "hand_dml", "ours_xml"))
        if ours_dml and hand:
            d[f"ours_over_hand_dml_{kind}"] = round(ours_dml / hand, 3)
        if ours_dml and xml:
            d[f"xml_over_dml_{kind}"] = round(xml / ours_dml, 3)
    for name in ("ours_dml", "hand_dml", "ours_xml"):
        if d.get(f"{name}_eager_s") and d.get(f"{name}_fast_s"):
            d[f"fast_speedup_{name}"] = round(d[f"{name}_eager_s"] / d[f"{name}_fast_s"], 2)
    if d.get("flops_dml") and d.get("flops_xml"):
        d["flop_ratio_xml_over_dml"] = round(d["flops_xml"] / d["flops_dml"], 3)


# --- part B: pipeline stages and --parallel fsdp on one process -------------------------------------------


def torchrun(script: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *script]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        return subprocess.CompletedProcess(command, 124, out, f"timed out after {timeout:.0f} s")
    sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
    return done


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def part_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """examples/pipeline_gpt2.py as one stage on one process; an xross step with --parallel fsdp on one process."""
    start = time.time()
    res = Results(args.out, {"part": "parallel", "processes": 1})
    d = res.data
    steps = 3 if args.quick else 40
    done = torchrun([str(ROOT / "examples" / "pipeline_gpt2.py"), "--steps", str(steps), "--log-every", "10"], 50)
    if done.returncode == 0:
        rates = re.findall(r"step +(\d+) +loss ([\d.]+) +([\d,]+) tokens/s", done.stdout)
        d["pipeline"] = "ran: 1 stage (the whole GPT-2) under Schedule1F1B, 4 micro-batches"
        if rates:
            d["pipeline_steps"] = int(rates[-1][0])
            d["pipeline_loss"] = float(rates[-1][1])
            d["pipeline_tokens_per_s"] = int(rates[-1][2].replace(",", ""))
    else:
        d["pipeline"] = f"failed (rc {done.returncode}): {last_line(done.stderr) or last_line(done.stdout)}"
    res.save()
    with tempfile.TemporaryDirectory() as tmp:
        worker = [str(Path(__file__).resolve()), "--fsdp-worker", "--result", f"{tmp}/fsdp.json"]
        worker += ["--device", args.device, "--batch", str(args.batch), "--steps", str(args.steps)]
        done = torchrun(worker, 35)
        result = Path(tmp) / "fsdp.json"
        if result.is_file():
            d.update(json.loads(result.read_text()))
        else:
            d["fsdp"] = f"failed (rc {done.returncode}): {last_line(done.stderr) or last_line(done.stdout)}"
    d["seconds"] = round(time.time() - start, 1)
    res.save()
    return d


def fsdp_worker(args: argparse.Namespace) -> None:
    """Under torchrun, one process: an xross xml run with --parallel fsdp; its step time, or why it is refused."""
    from xross.errors import XrossError
    from xross.methods.trainer import Trainer
    from xross.run.config import TrainConfig

    out: dict[str, Any] = {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    with tempfile.TemporaryDirectory() as tmp:
        data = data_archive(tmp, quick=True)
        cfg = TrainConfig(
            nets=NETS, cuts=["layer2"], mode="xml", data=data, subset=max(200, 2 * args.batch), eval_subset=10,
            batch_size=args.batch, epochs=1, out=f"{tmp}/run", cache_dir=f"{tmp}/cache", parallel="fsdp",
            device=args.device,
        )  # fmt: skip
        try:
            trainer = Trainer(cfg, force=True, progress=False)
        except XrossError as error:
            out["fsdp"] = f"needs 2 ranks: refused at world size {out['world_size']}: {error}"
        else:
            images, labels = next(iter(trainer.train_loader.epoch(0)))
            seconds = timed(lambda: trainer.train_step(images, labels), trainer.device, 2, args.steps)
            out["fsdp"] = f"ran with engine {trainer.parallel.name}"
            out["fsdp_xml_s"] = round(seconds, 5)
    Path(args.result).write_text(json.dumps(out))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("step", "parallel"), default="step")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--batch", type=int, help="images per step (default 256; --quick 8)")
    ap.add_argument("--steps", type=int, help="timed steps (default 20; --quick 2)")
    ap.add_argument("--warmup-fast", type=int, default=4, help="untimed steps before timing compiled ones")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="spec dense bf16 TFLOP/s (H100/H200 SXM)")
    ap.add_argument("--budget-s", type=float, default=135.0, help="start no measurement after this many seconds")
    ap.add_argument("--eager-only", action="store_true", help="skip the bf16/channels_last/compile steps")
    ap.add_argument("--threads", type=int, help="CPU threads on CPU (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny batch, 2 timed steps: the plumbing on CPU")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch = args.batch or (8 if args.quick else 256)
    args.steps = args.steps or (2 if args.quick else 20)
    if args.quick:
        args.warmup_fast = 1
    if args.fsdp_worker:
        return fsdp_worker(args)
    result = part_parallel(args) if args.part == "parallel" else part_step(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
