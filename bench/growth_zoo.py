"""Apply net2wider, net2deeper and net2branch to every torchvision classification model and check each keeps the function.

For each model and op: list the sites where the op applies (net2deeper: conv or linear, after a
non-negative value with its ReLU, elsewhere with ``activation=None``), apply it at
up to 10 sampled sites and measure max |grown(x) - model(x)| in float32 eval mode
against the tolerance 1e-4 * max |model(x)|. Then time widening every conv of
resnet50 by 1.5x in one call (best of 3). Weights that a fresh model holds constant
(zero ViT heads, unit BatchNorm statistics, 1e-6 ConvNeXt layer scales) are first given
random values, so that no layer is invisible at the output.

    python bench/growth_zoo.py                       # all 80 models
    python bench/growth_zoo.py --models resnet18,vit_b_16 --sites 3

Last line: {"models": 80, "net2wider_applies": N, "net2wider_preserves": N, ..., "resnet50_widen_all_s": T}
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.progress import track
from rich.table import Table

import growth
from growth.check import output_change, vary_constant_weights
from surgery_zoo import build  # the same models and small inputs as the surgery bench

warnings.filterwarnings("ignore", category=FutureWarning)

OPS = ("net2wider", "net2deeper", "net2branch")
DEFAULTS: dict[str, dict[str, Any]] = {"net2wider": {"factor": 1.5, "seed": 0}, "net2deeper": {}, "net2branch": {"seed": 0}}
# Argument variants tried in order; a site joins with the first variant that applies there.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "net2wider": [{}],
    "net2deeper": [{}, {"activation": None}, {"kind": "linear"}, {"kind": "linear", "activation": None, "batchnorm": False}],
    "net2branch": [{}],
}


@dataclass
class OpResult:
    sites: int = 0
    tried: int = 0
    preserved: int = 0
    worst: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def applies(self) -> bool:
        return self.sites > 0

    @property
    def preserves(self) -> bool:
        return self.applies and self.preserved == self.tried


def candidate_sites(model: torch.nn.Module, x: torch.Tensor, op: str) -> list[tuple[str, dict[str, Any]]]:
    found: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS[op]:
        for site in growth.sites(model, op, example_input=x, **variant):
            found.setdefault(site, variant)
    return list(found.items())


def bench_op(model: torch.nn.Module, x: torch.Tensor, op: str, k: int, rng: random.Random) -> OpResult:
    candidates = candidate_sites(model, x, op)
    result = OpResult(sites=len(candidates))
    for site, variant in rng.sample(candidates, min(k, len(candidates))):
        result.tried += 1
        try:
            grown = growth.OPS[op].apply(model, site, {**DEFAULTS[op], **variant}, example_input=x)
            change = output_change(model, grown, (x,))
        except Exception as e:  # noqa: BLE001 - a bench records failures instead of stopping
            result.errors.append(f"{site}: {type(e).__name__}: {str(e)[:160]}")
            continue
        result.worst = max(result.worst, change.relative)
        if change.within():
            result.preserved += 1
        else:
            result.errors.append(f"{site}: output moved by {change.relative:.2e} of max |y|")
        del grown
    return result


def time_resnet50_widen_all(runs: int = 3) -> float:
    net = torchvision.models.resnet50().eval()
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        growth.net2wider(net, convs, factor=1.5, seed=0)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset (default: every classification model)")
    parser.add_argument("--sites", type=int, default=10, help="sampled sites per op and model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    names = args.models.split(",") if args.models else sorted(torchvision.models.list_models(module=torchvision.models))
    console = Console(width=150)
    results: dict[str, dict[str, OpResult]] = {}
    seconds: dict[str, float] = {}
    for name in track(names, description="growing the zoo", console=console):
        start = time.perf_counter()
        model, x = build(name)
        vary_constant_weights(model, torch.Generator().manual_seed(args.seed))  # zero heads, unit norms: make them count
        rng = random.Random(f"{args.seed}:{name}")
        results[name] = {op: bench_op(model, x, op, args.sites, rng) for op in OPS}
        seconds[name] = time.perf_counter() - start
        del model
        gc.collect()
    widen_all = time_resnet50_widen_all()

    table = Table(title="function-preserving growth on the torchvision zoo (float32, eval)", header_style="bold")
    table.add_column("model")
    for op in OPS:
        table.add_column(f"{op} sites", justify="right")
        table.add_column("kept", justify="right")
    table.add_column("worst |Δ|/max|y|", justify="right")
    table.add_column("s", justify="right")
    for name, per_op in results.items():
        cells = [c for op in OPS for c in (str(per_op[op].sites), f"{per_op[op].preserved}/{per_op[op].tried}")]
        worst = max(r.worst for r in per_op.values())
        table.add_row(name, *cells, f"{worst:.1e}", f"{seconds[name]:.0f}")
    console.print(table)
    for name, per_op in results.items():
        for op, r in per_op.items():
            for error in r.errors:
                console.print(f"[red]{name} {op}[/] {error}", highlight=False)
            if not r.applies:
                console.print(f"[yellow]{name}: {op} applies nowhere[/]", highlight=False)
    console.print(f"widening every conv of resnet50 by 1.5x: {widen_all:.2f} s (best of 3); whole run {sum(seconds.values()) / 60:.1f} min")
    summary: dict[str, Any] = {"models": len(results)}
    for op in OPS:
        summary[f"{op}_applies"] = sum(r[op].applies for r in results.values())
        summary[f"{op}_preserves"] = sum(r[op].preserves for r in results.values())
    summary["resnet50_widen_all_s"] = round(widen_all, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
