"""Apply net2wider, net2deeper and net2branch to every torchvision classification model; check each keeps the function.

For each model and op: list the sites where the op applies (net2deeper: conv or linear, after a
non-negative value with its ReLU, elsewhere with ``activation=None``), apply it at
up to 10 sampled sites and measure max |grown(x) - model(x)| in float32 eval mode
against the tolerance 1e-4 * max |model(x)|. Then time widening every conv of
resnet50 by 1.5x in one call (best of 3). Weights that a fresh model holds constant
(zero ViT heads, unit BatchNorm statistics, 1e-6 ConvNeXt layer scales) are first given
random values, so that no layer is invisible at the output.

    python bench/growth_zoo.py                       # all 80 models
    python bench/growth_zoo.py --models resnet18,vit_b_16 --sites 3
    python bench/growth_zoo.py --timm                # + the timm zoo below (--timm-sites per op and model)
    python bench/growth_zoo.py --timm-only --timm-models mixnet_s,cspresnet50

Last line: {"models": 80, "net2wider_applies": N, "net2wider_preserves": N, ..., "resnet50_widen_all_s": T}; with
--timm also "timm_models", "timm_wider_applies", "timm_wider_preserves", "timm_deeper_applies", ...,
"timm_branch_preserves" and "timm_minutes". --timm-only skips the torchvision section (its keys are then missing).
The timm zoo covers one or two models of each family (ResNet, pre-activation ResNetV2, ResNeXt, SE, RegNet,
EfficientNet, MobileNetV3, MixNet, GhostNet, ReXNet, DLA, DPN, CSP, DenseNet, HRNet, ConvNeXt, ViT, DeiT, Swin,
MobileViT, Res2Net, SelecSLS, VoVNet, HardCoReNAS, TinyNet, LCNet, FBNet, PoolFormer, EdgeNeXt, RepVGG, ...),
built with random weights at a small input size (64 pixels where the model allows it).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.progress import track
from rich.table import Table
from surgery_zoo import build  # the same models and small inputs as the surgery bench

import growth
from growth.check import output_change, vary_constant_weights
from growth.errors import GrowthError

warnings.filterwarnings("ignore", category=FutureWarning)

OPS = ("net2wider", "net2deeper", "net2branch")
# timm model -> (input size, create_model kwargs); ViTs take the small size as their img_size.
TIMM_ZOO: dict[str, tuple[int, dict[str, Any]]] = {
    name: (64, {})
    for name in (
        "resnet18",
        "resnet26d",
        "resnetv2_50",
        "resnext26ts",
        "seresnext26d_32x4d",
        "regnetx_002",
        "regnety_002",
        "efficientnet_b0",
        "mobilenetv3_large_100",
        "mixnet_s",
        "tf_mixnet_s",
        "ghostnet_100",
        "ghostnetv2_100",
        "rexnet_100",
        "dla34",
        "dpn48b",
        "cspresnet50",
        "cspdarknet53",
        "cs3darknet_s",
        "densenet121",
        "hrnet_w18_small",
        "convnext_atto",
        "mobilevit_xxs",
        "res2net50_14w_8s",
        "selecsls42b",
        "ese_vovnet19b_dw",
        "hardcorenas_a",
        "tinynet_e",
        "lcnet_050",
        "fbnetc_100",
        "poolformer_s12",
        "edgenext_xx_small",
        "repvgg_a0",
        "efficientvit_b0",
        "skresnet18",
    )
} | {
    "vit_tiny_patch16_224": (64, {"img_size": 64}),
    "deit_tiny_patch16_224": (64, {"img_size": 64}),
    "swin_tiny_patch4_window7_224": (224, {}),
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "net2wider": {"factor": 1.5, "seed": 0},
    "net2deeper": {},
    "net2branch": {"seed": 0},
}
# What a refusal asks for, given as the user would: net2wider under a LayerNorm needs an integer factor.
RETRY: dict[str, tuple[str, dict[str, Any]]] = {"net2wider": ("give an integer factor", {"factor": 2.0})}
# Argument variants tried in order; a site joins with the first variant that applies there.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "net2wider": [{}],
    "net2deeper": [  # the identity layers (the kinds net2deeper lists with no kind given also include blocks)
        {"kind": "conv"},
        {"kind": "conv", "activation": None},
        {"kind": "linear"},
        {"kind": "linear", "activation": None, "batchnorm": False},
    ],
    "net2branch": [{}],
}


@dataclass
class OpResult:
    sites: int = 0
    tried: int = 0
    preserved: int = 0
    worst: float = 0.0
    errors: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)  # sites grown with the arguments a refusal asked for

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
            grown = _apply(model, x, op, site, {**DEFAULTS[op], **variant}, result)
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


def _apply(
    model: torch.nn.Module, x: torch.Tensor, op: str, site: str, args: dict[str, Any], result: OpResult
) -> torch.nn.Module:
    """The op at ``site``; if it refuses with a message naming other arguments (RETRY), once more with those."""
    try:
        return growth.OPS[op].apply(model, site, args, example_input=x)
    except GrowthError as e:
        hint, fix = RETRY.get(op, ("", {}))
        if not hint or hint not in str(e):
            raise
        result.retried.append(site)
        return growth.OPS[op].apply(model, site, {**args, **fix}, example_input=x)


def build_timm(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A timm model with random weights (eval mode) and a small input it accepts."""
    import timm

    size, kwargs = TIMM_ZOO.get(name, (64, {}))
    return timm.create_model(name, pretrained=False, **kwargs).eval(), torch.randn(2, 3, size, size)


def grow_zoo(
    names: list[str],
    build_model: Callable[[str], tuple[torch.nn.Module, torch.Tensor]],
    sites: int,
    seed: int,
    console: Console,
    description: str,
) -> tuple[dict[str, dict[str, OpResult]], dict[str, float]]:
    """Every op on every model: sites found, sampled sites tried and kept; and the seconds each model took."""
    results: dict[str, dict[str, OpResult]] = {}
    seconds: dict[str, float] = {}
    for name in track(names, description=description, console=console):
        start = time.perf_counter()
        model, x = build_model(name)
        vary_constant_weights(model, torch.Generator().manual_seed(seed))  # zero heads, unit norms: make them count
        rng = random.Random(f"{seed}:{name}")
        results[name] = {op: bench_op(model, x, op, sites, rng) for op in OPS}
        seconds[name] = time.perf_counter() - start
        del model
        gc.collect()
    return results, seconds


def report(console: Console, title: str, results: dict[str, dict[str, OpResult]], seconds: dict[str, float]) -> None:
    """The table of sites and kept outputs per model and op, then every failure and every op that applies nowhere."""
    table = Table(title=title, header_style="bold")
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
            for site in r.retried:
                console.print(f"{name} {op} {site}: refused 1.5 (LayerNorm), grown by 2", highlight=False)
            if not r.applies:
                console.print(f"[yellow]{name}: {op} applies nowhere[/]", highlight=False)


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
    parser.add_argument("--timm", action="store_true", help="also grow the timm zoo (TIMM_ZOO)")
    parser.add_argument("--timm-only", action="store_true", help="grow the timm zoo only")
    parser.add_argument("--timm-models", help="comma-separated timm models (default: TIMM_ZOO)")
    parser.add_argument("--timm-sites", type=int, default=3, help="sampled sites per op and timm model")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    console = Console(width=150)
    summary: dict[str, Any] = {}
    if not args.timm_only:
        every = sorted(torchvision.models.list_models(module=torchvision.models))
        names = args.models.split(",") if args.models else every
        results, seconds = grow_zoo(names, build, args.sites, args.seed, console, "growing the zoo")
        widen_all = time_resnet50_widen_all()
        report(console, "function-preserving growth on the torchvision zoo (float32, eval)", results, seconds)
        console.print(
            f"widening every conv of resnet50 by 1.5x: {widen_all:.2f} s (best of 3); "
            f"whole run {sum(seconds.values()) / 60:.1f} min"
        )
        summary["models"] = len(results)
        for op in OPS:
            summary[f"{op}_applies"] = sum(r[op].applies for r in results.values())
            summary[f"{op}_preserves"] = sum(r[op].preserves for r in results.values())
        summary["resnet50_widen_all_s"] = round(widen_all, 3)
    if args.timm or args.timm_only:
        names = args.timm_models.split(",") if args.timm_models else list(TIMM_ZOO)
        results, seconds = grow_zoo(names, build_timm, args.timm_sites, args.seed, console, "growing the timm zoo")
        report(console, "function-preserving growth on timm models (float32, eval)", results, seconds)
        summary["timm_models"] = len(results)
        for op in OPS:
            short = op.removeprefix("net2")
            summary[f"timm_{short}_applies"] = sum(r[op].applies for r in results.values())
            summary[f"timm_{short}_preserves"] = sum(r[op].preserves for r in results.values())
        summary["timm_minutes"] = round(sum(seconds.values()) / 60, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
