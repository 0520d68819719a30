"""Cut every torchvision classification model at every top-level boundary (+ one mid-block point).

For each model: are the pieces exact (torch.equal in eval mode), and how long does
``surgery.cut`` take compared with plain ``torch.fx.symbolic_trace`` of the same model
(best of several runs each, measured in this run)?

    python bench/surgery_zoo.py                 # all 80 models
    python bench/surgery_zoo.py --models resnet18,vit_b_16

Last line: {"models": M, "exact": N, "median_cut_over_trace": R}
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings

import torch
import torchvision
from rich.console import Console
from rich.progress import track
from rich.table import Table

import surgery
from surgery.names import GraphIndex
from surgery.tracing import trace_graph

warnings.filterwarnings("ignore", category=FutureWarning)


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model with random weights and a small input it accepts."""
    kwargs: dict = {}
    size = 64
    if name.startswith("vit_"):
        kwargs["image_size"] = 4 * int(name.rsplit("_", 1)[1])  # 4x4 patches
        size = kwargs["image_size"]
    elif name == "maxvit_t":
        size = 224  # its partitions need 224
    elif name == "inception_v3":
        size = 96
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return model, torch.randn(2, 3, size, size)


def boundaries(model: torch.nn.Module) -> tuple[list[str], str | None]:
    """Top-level children that end at distinct points (in graph order), and one mid-block cut point."""
    index = GraphIndex(trace_graph(model))
    points = surgery.cut_points(model, include_nodes=False)
    ends: dict[int, str] = {}
    for child, _ in model.named_children():
        calls = index.module_calls.get(child)
        if calls and len(calls) == 1:
            ends.setdefault(max(calls[0]), child)
    last = max(p.position for p in points)
    top = [ends[p] for p in sorted(ends) if p <= last]
    mid = next((p.name for p in points if p.crossing > 1), None)
    return top, mid


def best_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated subset (default: all)")
    args = ap.parse_args()
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    console = Console()
    table = Table(title="surgery.cut on the torchvision zoo", title_justify="left")
    for col in ("model", "cuts", "mid-block cut", "exact", "trace ms", "cut ms", "cut/trace"):
        table.add_column(col, justify="right" if col.endswith(("ms", "trace")) else "left")
    exact, ratios = 0, []
    torch.set_grad_enabled(False)
    for name in track(names, description="cutting", console=console, transient=True):
        model, x = build(name)
        top, mid = boundaries(model)
        ref = model(x)
        ok = torch.equal(surgery.cut(model, top)(x), ref)
        if mid is not None:
            ok = ok and torch.equal(surgery.cut(model, [mid])(x), ref)
        t_trace = best_time(lambda: torch.fx.symbolic_trace(model))
        t_cut = best_time(lambda: surgery.cut(model, top))
        exact += ok
        ratios.append(t_cut / t_trace)
        table.add_row(name, str(len(top)), mid or "-", "yes" if ok else "[red]NO[/]", f"{t_trace * 1e3:.1f}", f"{t_cut * 1e3:.1f}", f"{t_cut / t_trace:.2f}")
        del model, ref
        gc.collect()
    console.print(table)
    print(json.dumps({"models": len(names), "exact": exact, "median_cut_over_trace": round(statistics.median(ratios), 3)}))


if __name__ == "__main__":
    main()
