"""Pieces as pipeline stages (issue 29): ``surgery.pipeline`` against torch's own splitter, over the zoo.

For each model of ``bench/transformers_zoo.py``'s FAMILIES (small configs, 4 layers, random
weights, float64, eval) and each stage count S (2 and 4), ``torchrun --nproc_per_node=S
bench/pipeline_rank.py`` runs one 1F1B training step (4 micro-batches of 2) of

* "ours": the stages of ``surgery.pipeline(model, S, micro_batch, balance="flops")`` at the
  family's layer stack, the tied parameters' gradients summed across the stages holding them;
* "torch": ``torch.distributed.pipelining.pipeline(model, mb_args, mb_kwargs,
  split_spec={cut: SplitPoint.END})`` at the same cuts (``plan.cuts``), ``pipe.build_stage``;

"yes" when the loss (mean squared error against a random target of the output's shape) and
every parameter's gradient are within 1e-9 relative of the unsplit model's (a gradient relative
to its parameter's largest, floored at 1e-6 of the model's largest), and every parameter is held
by some stage; else the reason, one line per failure under the table. "imbalance" is the largest
stage's FLOPs over the mean, minus 1. Then the throughput of an 8-layer GPT-2 of width 256
(float32, batch 8 x 128, AdamW) as 2 stages on 2 processes against the unsplit model on 1
process, one thread each (tokens/s, median step, the slowest rank's).

    python -u bench/pipeline.py                        # the default models, 2 and 4 stages
    python -u bench/pipeline.py --quick                # 3 models, 2 stages, 3 timed steps
    python -u bench/pipeline.py --models gpt2,vit-timm --stages 2

Last line: {"models": N, "ours_exact": a, "torch_pipeline_exact": b, "max_imbalance": i, "two_stage_speedup": s}
(a, b: models exact at every stage count run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TOLERANCE = 1e-9
DEFAULT = "gpt2,llama,mistral,qwen2,opt,gpt_neox,phi,gemma,qwen3,bloom,starcoder2,bert,roberta,vit-hf,vit-timm"
QUICK = ["gpt2", "llama", "bert"]


def slug(name: str) -> str:
    """A family's name for ``--models``: ``vit (timm)`` -> ``vit-timm``."""
    return re.sub(r"[ ()]+", "-", name).strip("-")


def torchrun(nproc: int, args: list[str], out: Path, timeout: float) -> tuple[list[dict[str, Any]], str | None]:
    """The ranks' JSON records of one ``pipeline_rank.py`` run, or the one-line reason there are none."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [*command, str(BENCH / "pipeline_rank.py"), *args, str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # torchrun and its ranks: one process group to stop on a timeout
    )
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return [], f"timed out after {timeout:.0f} s"
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if process.returncode != 0 or not records:
        errors = [line for line in log.splitlines() if re.match(r"^\w*(Error|Exception)\b", line)]
        return records, (errors[-1] if errors else log.strip().splitlines()[-1] if log.strip() else "no output")[:200]
    return records, None


def verdict(ranks: list[dict[str, Any]], side: str) -> tuple[bool, str]:
    """Whether ``side`` ("ours", "torch") matched the unsplit model on every rank, and why not."""
    for record in ranks:
        result = record[side]
        if "error" in result:
            return False, result["error"]
        if result["missing"]:
            return False, f"no gradient for {', '.join(result['missing'][:3])} on rank {record['rank']}"
        if result["grad_rel"] > TOLERANCE:
            return False, f"gradient of {result['worst']} off by {result['grad_rel']:.1e} (rank {record['rank']})"
    loss = ranks[-1][side].get("loss_rel")
    if loss is None or loss > TOLERANCE:
        return False, f"loss off by {loss:.1e}" if loss is not None else "no loss on the last rank"
    held = set().union(*(r[side]["checked"] for r in ranks))
    unheld = sorted(set(ranks[0]["params"]) - held)
    if unheld:
        return False, f"parameters no stage holds: {', '.join(unheld[:3])}"
    worst = max(r[side]["grad_rel"] for r in ranks)
    return True, f"{worst:.0e}"


def check(name: str, stages: int, timeout: float) -> dict[str, Any]:
    """One model at one stage count: both sides' verdicts, our cuts and imbalance, the wall time."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ranks, error = torchrun(stages, ["check", name], Path(tmp), timeout)
    row: dict[str, Any] = {"seconds": time.perf_counter() - began}
    if error or len(ranks) != stages:
        reason = error or f"{len(ranks)} of {stages} ranks wrote results"
        return {**row, "ours": (False, reason), "torch": (False, reason), "imbalance": None, "cuts": []}
    ranks.sort(key=lambda r: r["rank"])
    row.update(ours=verdict(ranks, "ours"), torch=verdict(ranks, "torch"))
    return {**row, "imbalance": ranks[0].get("imbalance"), "cuts": ranks[0].get("cuts", [])}


def speed(steps: int, timeout: float) -> dict[int, Any]:
    """Tokens/s of the unsplit GPT-2 on 1 process and of its 2 stages on 2 (or the reason there are none)."""
    results: dict[int, Any] = {}
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            records, error = torchrun(world, ["speed", str(steps)], Path(tmp), timeout)
        results[world] = error if error else records[0]
    return results


def main() -> None:
    from transformers_zoo import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated families (default: {DEFAULT}; 'all': the zoo)")
    parser.add_argument("--stages", help="comma-separated stage counts (default: 2,4)")
    parser.add_argument("--quick", action="store_true", help=f"{','.join(QUICK)} at 2 stages, 3 timed steps")
    parser.add_argument("--steps", type=int, default=8, help="timed steps of the throughput run (0: skip it)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per torchrun (default: 300)")
    args = parser.parse_args()
    known = {slug(f.name): f.name for f in FAMILIES}
    if args.quick and (args.models or args.stages):
        parser.error("--quick picks its own models and stages; drop --models/--stages or --quick")
    names = QUICK if args.quick else list(known) if args.models == "all" else (args.models or DEFAULT)
    names = names.split(",") if isinstance(names, str) else names
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        counts = [2] if args.quick else [int(s) for s in (args.stages or "2,4").split(",")]
    except ValueError:
        parser.error(f"--stages takes comma-separated integers, not {args.stages!r}")
    if any(s < 2 for s in counts):
        parser.error("--stages: each stage count must be at least 2")
    steps = 3 if args.quick else args.steps

    console = Console(width=200)
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for name in names:
        rows[name] = {}
        for stages in counts:
            row = rows[name][stages] = check(known[name], stages, args.timeout)
            console.print(
                f"{name} x{stages}: {row['seconds']:.0f} s; ours {_cell(row['ours'])}, torch {_cell(row['torch'])}",
                highlight=False,
            )
    timed = speed(steps, args.timeout) if steps else {}

    table = Table(title="pipeline stages, one 1F1B step vs the unsplit model (float64, eval, gloo)")
    table.add_column("model")
    for side in ("ours", "torch"):
        for stages in counts:
            table.add_column(f"{side} {stages}")
    table.add_column("imbalance (FLOPs)", justify="right")
    table.add_column("cuts")
    notes = []
    for name, by_count in rows.items():
        cells = [_cell(by_count[s][side]) for side in ("ours", "torch") for s in counts]
        balance = " / ".join("-" if r["imbalance"] is None else f"{r['imbalance']:.3f}" for r in by_count.values())
        table.add_row(name, *cells, balance, " | ".join(",".join(r["cuts"]) for r in by_count.values()))
        notes += [
            f"{name} {side} {s}: {by_count[s][side][1]}" for side in ("ours", "torch") for s in counts
            if not by_count[s][side][0]
        ]  # fmt: skip
    console.print(table)
    for note in notes:
        console.print(note, highlight=False, markup=False)
    speedup = None
    if timed:
        for world, result in timed.items():
            what = f"{result['tokens_per_s']:.0f} tokens/s" if isinstance(result, dict) else result
            console.print(f"GPT-2 8x256 float32, {world} process(es): {what}", highlight=False)
        if all(isinstance(r, dict) for r in timed.values()):
            speedup = round(timed[2]["tokens_per_s"] / timed[1]["tokens_per_s"], 3)
    exact = {side: sum(all(r[side][0] for r in by.values()) for by in rows.values()) for side in ("ours", "torch")}
    imbalances = [r["imbalance"] for by in rows.values() for r in by.values() if r["imbalance"] is not None]
    summary = {
        "models": len(rows),
        "ours_exact": exact["ours"],
        "torch_pipeline_exact": exact["torch"],
        "max_imbalance": round(max(imbalances), 4) if imbalances else None,
        "two_stage_speedup": speedup,
    }
    print(json.dumps(summary))


def _cell(verdict: tuple[bool, str]) -> str:
    return f"yes ({verdict[1]})" if verdict[0] else "NO"


if __name__ == "__main__":
    main()
