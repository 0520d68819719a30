"""Cut every torchvision classification model at every top-level boundary (+ one mid-block point).

For each model: are the pieces exact (torch.equal in eval mode), and how long does
``surgery.cut`` take compared with plain ``torch.fx.symbolic_trace`` of the same model
(best of several runs each, measured in this run)?

    python bench/surgery_zoo.py                 # all 80 models
    python bench/surgery_zoo.py --models resnet18,vit_b_16
    python bench/surgery_zoo.py --onnx          # + each model cut in 2, exported to ONNX, run in onnxruntime

Last line: {"models": M, "exact": N, "median_cut_over_trace": R}; with --onnx also
"onnx_exported" (every piece exported and loaded by onnxruntime), "onnx_match" (and the
chained pieces match the model to 1e-4 * max(1, max|y|) at batch sizes 2 and 1),
"onnx_exporter" and "onnx_minutes". --onnx-exporter dynamo|torchscript compares the two
exporters (default: auto, as surgery.export); --onnx-only skips the cutting section (its
keys are then missing).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.markup import escape
from rich.progress import track
from rich.table import Table

import surgery
from surgery.core.errors import SurgeryError
from surgery.core.util import first_line
from surgery.exporters import EXPORTERS, CheckFailed, read_manifest
from surgery.graph.fx import trace_graph
from surgery.graph.names import GraphIndex

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


def cut_section(names: list[str], console: Console) -> dict:
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
        t_trace = best_time(lambda model=model: torch.fx.symbolic_trace(model))
        t_cut = best_time(lambda model=model, top=top: surgery.cut(model, top))
        exact += ok
        ratios.append(t_cut / t_trace)
        table.add_row(
            name,
            str(len(top)),
            mid or "-",
            "yes" if ok else "[red]NO[/]",
            f"{t_trace * 1e3:.1f}",
            f"{t_cut * 1e3:.1f}",
            f"{t_cut / t_trace:.2f}",
        )
        del model, ref
        gc.collect()
    console.print(table)
    return {"exact": exact, "median_cut_over_trace": round(statistics.median(ratios), 3)}


def onnx_section(names: list[str], console: Console, exporter: str) -> dict:
    """Each model cut in 2 at its middle top-level boundary, exported to ONNX and checked in onnxruntime."""
    table = Table(title=f"surgery.export to ONNX, 2 pieces (exporter: {exporter})", title_justify="left")
    for col in ("model", "cut", "exported", "match", "exporter", "max |diff| chained", "s", "why not"):
        table.add_column(col, justify="right" if col in ("s", "max |diff| chained") else "left")
    exported = match = 0
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="surgery-zoo-onnx-"))
    try:
        for name in track(names, description="exporting", console=console, transient=True):
            model, x = build(name)
            top, _ = boundaries(model)
            at = top[len(top) // 2]
            pieces = surgery.cut(model, [at], x)
            t = time.perf_counter()
            done = ok = False
            how, diff, why = "-", "-", ""
            try:
                m = read_manifest(surgery.export(pieces, scratch / name, "onnx", x, exporter=exporter))
                done = ok = True
                how = ",".join(p["exporter"] for p in m["pieces"])
                diff = f"{m['check']['chain_max_abs_diff']:.2g}"
            except CheckFailed as e:
                done, why = True, str(e)
            except SurgeryError as e:
                why = str(e)
            except Exception as e:  # a bug, not a limit of the exporter: keep going, but say so
                why = f"unexpected {type(e).__name__}: {first_line(e)}"
            exported += done
            match += ok
            yes = {True: "yes", False: "[red]NO[/]"}
            table.add_row(name, at, yes[done], yes[ok], how, diff, f"{time.perf_counter() - t:.1f}", escape(why))
            shutil.rmtree(scratch / name, ignore_errors=True)
            del model, pieces
            gc.collect()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    console.print(table)
    minutes = round((time.perf_counter() - start) / 60, 1)
    return {"onnx_exporter": exporter, "onnx_exported": exported, "onnx_match": match, "onnx_minutes": minutes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated subset (default: all)")
    ap.add_argument("--onnx", action="store_true", help="also export each model cut in 2 to ONNX and check it")
    ap.add_argument("--onnx-only", action="store_true", help="only the ONNX section")
    ap.add_argument("--onnx-exporter", choices=EXPORTERS, default="auto", help="torch.onnx exporter (default: auto)")
    args = ap.parse_args()
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    console = Console()
    result: dict = {"models": len(names)}
    if not args.onnx_only:
        result.update(cut_section(names, console))
    if args.onnx or args.onnx_only:
        result.update(onnx_section(names, console, args.onnx_exporter))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
