"""Real-size transformers for ``bench/transformers_zoo.py --real-size`` (random weights, float32, eval).

GPT-2 124M (``GPT2Config()``), a 1.1B LLaMA of TinyLlama's shape (hidden 2048, 22 layers,
intermediate 5632, 32 heads, 4 key-value heads, vocabulary 32000) and ViT-B/16 (``ViTConfig()``,
224 px). Each model runs in a fresh subprocess (``python bench/zoo_real_size.py NAME`` prints one
JSON line) so one model's memory does not count for another's. Per model:

- ``cut_s``: median time of ``surgery.cut(model, <every layer boundary>, example)``; ``export_s``:
  median time of ``torch.export.export(model, ..., dynamic_shapes=<Dim.AUTO everywhere>, strict=False)``,
  the capture the cut rests on (3 runs each; 1 when the first cut takes over a minute: ``runs``);
- ``wider_s``: ``growth.net2wider`` of the first MLP layer (factor 2); ``deeper_s``: ``growth.net2deeper``
  of the middle layer (``kind="block"``); each then checked to keep the output within 1e-5 x max |y|;
- ``peak_over_params``: the peak resident set (``VmHWM`` of ``/proc/self/status``) during build,
  cuts and exports, less the resident set after imports, over the parameter bytes;
  ``grow_peak_over_params`` the same during growth alone (the peak is reset through
  ``/proc/self/clear_refs`` first; growth edits a copy, so it holds two models at once).

Every time is wall-clock with the process's CPU seconds beside it (``*_cpu_s``, all threads),
and the load average is recorded: on a shared machine the wall clock counts others' work too.

The example is 2 sequences of 12 tokens (with a padded end) or 2 images.
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

import growth
import surgery
from growth.check import output_change
from surgery.graph.inputs import Example
from surgery.graph.torch_export import dynamic_shapes

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
TOLERANCE = 1e-5
SLOW_S = 60.0  # a first cut slower than this is timed once
TARGETS = {"cut_over_export": 1.5, "grow_s": 20.0, "peak_over_params": 1.5}
LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
# name: (class, config, layer container, first MLP layer, input)
MODELS: dict[str, tuple[str, dict[str, Any], str, str, str]] = {
    "gpt2": ("GPT2LMHeadModel", {}, "transformer.h", "transformer.h.0.mlp.c_fc", "text"),
    "llama": ("LlamaForCausalLM", LLAMA_1B, "model.layers", "model.layers.0.mlp.gate_proj", "text"),
    "vit": ("ViTForImageClassification", {}, "vit.layers", "vit.layers.0.mlp.fc1", "pixels"),
}


def _resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _example(kind: str) -> Example:
    generator = torch.Generator().manual_seed(0)
    if kind == "pixels":
        return Example((), {"pixel_values": torch.randn(2, 3, 224, 224, generator=generator)})
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, -2:] = 0
    return Example((), {"input_ids": torch.randint(1, 256, (2, 12), generator=generator), "attention_mask": mask})


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process, all threads) of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_times(times: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def _first(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value.logits


def _grow(model: torch.nn.Module, example: Example, op: Callable[[], torch.nn.Module]) -> dict[str, Any]:
    """Time ``op`` (a growth of ``model``), then check the grown model keeps the output."""
    grown: list[torch.nn.Module] = []
    try:
        wall, cpu = timed(lambda: grown.append(op()))
    except Exception as e:  # noqa: BLE001 - a bench records failures instead of stopping
        return {"s": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    change = output_change(model, grown[0], example)
    grown.clear()
    gc.collect()
    return {"s": round(wall, 2), "cpu_s": round(cpu, 2), "preserves": change.max_abs <= TOLERANCE * change.scale}


def measure(name: str) -> dict[str, Any]:
    """Every figure of one real-size model (run in a fresh process: its peak memory is its own)."""
    cls, config, layers, mlp, kind = MODELS[name]
    base_kib = _resident_kib("VmRSS")
    torch.manual_seed(0)
    model = surgery.build_model(f"hf:{cls}", config=config).eval()
    model.config.use_cache = False
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    example = _example(kind)
    depth = model.config.num_hidden_layers
    cuts = [f"{layers}.{i}" for i in range(depth - 1)]
    load = os.getloadavg()[0]
    first = timed(lambda: surgery.cut(model, cuts, example))
    runs = 1 if first[0] > SLOW_S else 3
    cut_s, cut_cpu = median_times([first] + [timed(lambda: surgery.cut(model, cuts, example)) for _ in range(runs - 1)])
    dynamic = dynamic_shapes(example)
    export_s, export_cpu = median_times(
        [
            timed(
                lambda: torch.export.export(model, example.args, example.kwargs, dynamic_shapes=dynamic, strict=False)
            )
            for _ in range(runs)
        ]
    )
    gc.collect()
    peak_kib = _resident_kib("VmHWM")
    _reset_peak()
    wider = _grow(model, example, lambda: growth.net2wider(model, mlp, factor=2.0, seed=0, example_input=example))
    middle = f"{layers}.{depth // 2}"
    deeper = _grow(model, example, lambda: growth.net2deeper(model, middle, kind="block", example_input=example))
    grow_peak_kib = _resident_kib("VmHWM")
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "param_bytes": params,
        "input": example.describe(),
        "cuts": len(cuts),
        "runs": runs,
        "cut_s": round(cut_s, 2),
        "export_s": round(export_s, 2),
        "cut_over_export": round(cut_s / export_s, 3),
        "cut_cpu_s": round(cut_cpu, 2),
        "export_cpu_s": round(export_cpu, 2),
        "cut_over_export_cpu": round(cut_cpu / export_cpu, 3),
        "net2wider": {"at": mlp, **wider},
        "net2deeper": {"at": middle, **deeper},
        "peak_mib": round((peak_kib - base_kib) / 1024),
        "peak_over_params": round((peak_kib - base_kib) * 1024 / params, 3),
        "grow_peak_over_params": round((grow_peak_kib - base_kib) * 1024 / params, 3),
        "base_rss_mib": round(base_kib / 1024),
        "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],  # at the first cut, at the end
    }


def run_all(names: list[str], say: Callable[[str], None]) -> dict[str, Any]:
    """Measure each model in its own subprocess; print one line per model; the figures with the targets."""
    models: dict[str, Any] = {}
    for name in names:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, check=False)
        lines = done.stdout.strip().splitlines()
        try:
            models[name] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            models[name] = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        models[name]["wall_s"] = round(time.perf_counter() - start, 1)
        say(_line(name, models[name]))
    return _summary(models)


def _line(name: str, m: dict[str, Any]) -> str:
    if "error" in m:
        return f"{name}: FAILED {m['error']} ({m['wall_s']} s)"
    t = TARGETS
    grown = ", ".join(
        f"{op} {m[op]['s']} s, cpu {m[op].get('cpu_s')} s (target <= {t['grow_s']:g}; "
        + (m[op]["error"] if "error" in m[op] else "preserves" if m[op]["preserves"] else "OUTPUT MOVED")
        + ")"
        for op in ("net2wider", "net2deeper")
    )
    return (
        f"{name} ({m['params'] / 1e6:.0f}M params, {m['param_bytes'] / 2**30:.2f} GiB, on {m['input']}): "
        f"cut at {m['cuts']} boundaries {m['cut_s']} s / export {m['export_s']} s = {m['cut_over_export']} "
        f"(target <= {t['cut_over_export']}; median of {m['runs']}; cpu {m['cut_cpu_s']} / {m['export_cpu_s']} s "
        f"= {m['cut_over_export_cpu']}); {grown}; "
        f"peak {m['peak_mib']} MiB above imports = {m['peak_over_params']}x params (target <= "
        f"{t['peak_over_params']}), during growth {m['grow_peak_over_params']}x; {m['wall_s']} s in all, "
        f"load average {m['load_average'][0]} -> {m['load_average'][1]} on {os.cpu_count()} cores"
    )


def _summary(models: dict[str, Any]) -> dict[str, Any]:
    ok = [m for m in models.values() if "error" not in m]
    grown = [m[op] for m in ok for op in ("net2wider", "net2deeper") if m[op]["s"] is not None]
    return {
        "real_size": True,
        "models": models,
        "median_cut_over_export": round(statistics.median(m["cut_over_export"] for m in ok), 3) if ok else None,
        "max_grow_s": max(g["s"] for g in grown) if grown else None,
        "max_grow_cpu_s": max(g["cpu_s"] for g in grown) if grown else None,
        "max_peak_over_params": max(m["peak_over_params"] for m in ok) if ok else None,
        "max_grow_peak_over_params": max(m["grow_peak_over_params"] for m in ok) if ok else None,
        "targets": TARGETS,
    }


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
