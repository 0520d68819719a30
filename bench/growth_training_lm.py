"""Grow language models while training (the ``--lm`` setting of ``bench/growth_training.py``).

Corpus: the Python standard library's own sources on this machine (``sysconfig.get_paths()["stdlib"]``,
every ``*.py`` below it except ``site-packages``), read as bytes (vocabulary 256, no tokenizer). The files
are split once, seeded (split seed 0, the same for every run): 5 % of the files are held out. Training
draws ``batch`` random windows of ``seq + 1`` bytes per step from the training files (concatenated), from
a generator seeded by the run's seed, so a grown run and its from-scratch target see the same batches.
The held-out loss is the mean token cross-entropy over a fixed set of held-out windows (split seed). The
corpus is read where it lies: it is never copied or written.

Models (random init, Hugging Face's own, seeded): a GPT-2 (``GPT2LMHeadModel``, tied embeddings, dropout
off) and a LLaMA (``LlamaForCausalLM``, GQA 8 heads / 4 key-value heads, head size 32, untied embeddings).
The target: hidden 256, 4 layers, MLP 1024 (GPT-2) / 688 (LLaMA). The small ones: ``wider`` at half width
(hidden 128, heads and key-value heads halved, MLP halved, 4 layers), grown by ``grow_transformer(width=2)``
at 25 % of the steps; ``deeper`` at half depth (2 layers), grown by ``grow_transformer(depth=2)`` at 25 %.
The grown model's config must equal the target's (checked, every key).

Training (nanoGPT-style, the same for every run): AdamW (betas 0.9/0.95, weight decay 0.1), lr warm-up over
the first 10 % of the steps then cosine to 10 % of the peak, grad-norm clip 1.0. At the growth step the
model is replaced by the grown one and the optimiser is rebuilt with a fresh AdamW state; the lr schedule
goes on. The loss of that step's batch is measured before and after growth (must agree to 1e-4 relative).

FLOPs: ``surgery.count_flops`` of one window's forward (it counts the HF models' matmuls and attention;
close to 2 x params x tokens), once per structure; a training step costs 3 x forward x batch; cumulative.
Headline: the fraction of the scratch run's training FLOPs at which the grown run first reaches the scratch
run's final held-out loss (linear between evals, from the step-0 eval); ``null`` if never. ``compute_saved``
of a variant: 1 - the mean fraction when every seed reaches it, else ``null``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.table import Table

import growth
import surgery
from surgery.core.util import atomic_write_text
from xross.analysis.plots import pyplot, save_png

transformers.logging.set_verbosity_error()
HELD_OUT = 0.05  # fraction of the files held out
SPLIT_SEED = 0
GROW_AT = 0.25  # fraction of the steps after which the small models grow
TOLERANCE = 1e-4  # relative change of the growth batch's loss


@dataclass(frozen=True)
class Corpus:
    """The stdlib's bytes: training files concatenated, held-out files concatenated."""

    train: torch.Tensor
    held_out: torch.Tensor
    files: tuple[int, int]


def load_corpus() -> Corpus:
    """Read the stdlib's ``*.py`` files (not ``site-packages``) and split them by file, seeded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if len(files) < 20:
        raise SystemExit(f"only {len(files)} .py files under {root}: the LM setting needs the stdlib's sources")
    order = list(range(len(files)))
    random.Random(SPLIT_SEED).shuffle(order)
    cut = max(1, round(HELD_OUT * len(files)))

    def read(indices: list[int]) -> torch.Tensor:
        data = b"\n".join(files[k].read_bytes() for k in sorted(indices))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    return Corpus(read(order[cut:]), read(order[:cut]), (len(files) - cut, cut))


def windows(data: torch.Tensor, count: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``seq + 1`` bytes (inputs and next-byte targets)."""
    starts = torch.randint(0, len(data) - seq - 1, (count,), generator=generator)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def gpt2(hidden: int, layers: int, seq: int) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=seq, n_embd=hidden, n_layer=layers, n_head=hidden // 32, n_inner=4 * hidden,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def llama(hidden: int, layers: int, seq: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=688 * hidden // 256, num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64, head_dim=32, num_hidden_layers=layers, max_position_embeddings=seq,
        tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


BUILDERS = {"gpt2": gpt2, "llama": llama}
# variant -> ((hidden, layers) of the model it starts as, grow_transformer's arguments or None)
VARIANTS: dict[str, tuple[tuple[int, int], dict[str, Any] | None]] = {
    "scratch": ((256, 4), None),
    "wider": ((128, 4), {"width": 2}),
    "deeper": ((256, 2), {"depth": 2}),
}


def build(family: str, variant: str, seq: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    (hidden, layers), _ = VARIANTS[variant]
    model: torch.nn.Module = BUILDERS[family](hidden, layers, seq)
    return model.train()


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of ``batch`` (windows of seq + 1)."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, held_out: torch.Tensor, chunk: int = 32) -> float:
    model.eval()
    losses = [float(lm_loss(model, held_out[k : k + chunk])) * len(held_out[k : k + chunk])
              for k in range(0, len(held_out), chunk)]  # fmt: skip
    model.train()
    return sum(losses) / len(held_out)


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 10 % of the steps, then cosine to 10 % of ``peak``."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def forward_flops(model: torch.nn.Module, seq: int) -> int:
    return int(surgery.count_flops(model, input_ids=torch.zeros(1, seq, dtype=torch.long)))


def check_config(grown: torch.nn.Module, target: torch.nn.Module, what: str) -> None:
    grown_config: Any = grown.config
    target_config: Any = target.config
    a, b = grown_config.to_dict(), target_config.to_dict()
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differ:
        raise SystemExit(f"{what}: the grown config differs from the target's in {differ}")


def train_run(family: str, variant: str, seed: int, corpus: Corpus, held_out: torch.Tensor,
              args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Train one model (growing it at 25 % when the variant grows); its eval curve against cumulative FLOPs."""
    start = time.time()
    model = build(family, variant, args.lm_seq, seed)
    grow_args = VARIANTS[variant][1]
    params_before = surgery.count_params(model)
    grow_at = round(GROW_AT * args.lm_steps) if grow_args else None
    data = torch.Generator().manual_seed(1000 + seed)
    opt = adamw(model, args.lm_lr)
    fwd = forward_flops(model, args.lm_seq)
    flops, curve, train_losses = 0.0, [(0.0, evaluate(model, held_out))], []
    growth_record: dict[str, Any] = {}
    every = max(1, args.lm_steps // 10)
    for step in range(args.lm_steps):
        batch = windows(corpus.train, args.lm_batch, args.lm_seq, data)
        if step == grow_at and grow_args:
            model, growth_record = grow(model, family, grow_args, batch, seed, args.lm_seq)
            opt, fwd = adamw(model, args.lm_lr), forward_flops(model, args.lm_seq)
            growth_record["train_flops"] = flops
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lm_steps, args.lm_lr)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        flops += 3.0 * fwd * args.lm_batch
        train_losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == args.lm_steps:
            curve.append((flops, evaluate(model, held_out)))
    return {
        "model": family, "variant": variant, "seed": seed, "wall_s": round(time.time() - start, 1),
        "params_before": params_before, "params_after": surgery.count_params(model),
        "flops": [f for f, _ in curve], "loss": [round(v, 5) for _, v in curve], "final_loss": round(curve[-1][1], 5),
        "final_train_loss": round(statistics.mean(train_losses[-10:]), 5), "growth": growth_record,
    }  # fmt: skip


def grow(model: torch.nn.Module, family: str, grow_args: dict[str, Any], batch: torch.Tensor, seed: int,
         seq: int) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """The grown model (its config checked against the target's) and the growth batch's loss before/after."""
    with torch.no_grad():
        model.eval()
        before = float(lm_loss(model, batch))
        grown = growth.grow_transformer(model, **grow_args, seed=seed, example_input={"input_ids": batch[:2, :-1]})
        grown.eval()
        after = float(lm_loss(grown, batch))
    check_config(grown, build(family, "scratch", seq, seed), f"{family} grown by {grow_args}")
    if type(grown) is not type(model):
        raise SystemExit(f"grow_transformer returned a {type(grown).__name__}, not the {type(model).__name__}")
    if not abs(after - before) <= TOLERANCE * abs(before):
        raise SystemExit(f"{family} grown by {grow_args}: the batch loss moved {before:.6f} -> {after:.6f}")
    return grown.train(), {"loss_before": round(before, 6), "loss_after": round(after, 6), "args": grow_args}


def flops_to_reach(record: dict[str, Any], target: float) -> float | None:
    """Training FLOPs at which the eval curve first reaches ``target`` loss (linear between evals)."""
    points = list(zip(record["flops"], record["loss"]))
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return f1 if l1 == l0 else f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return None


def summarise(records: dict[str, list[dict[str, Any]]], console: Console) -> dict[str, dict[str, Any]]:
    """The table of every run and each grown variant's fraction of scratch FLOPs (and compute saved)."""
    table = Table(title="growing language models while training: every run", title_justify="left")
    for col in ("model", "variant", "seed", "params before", "params after", "growth loss before -> after",
                "final held-out loss", "train TFLOPs", "wall s", "fraction of scratch FLOPs"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    settings: dict[str, dict[str, Any]] = {}
    for family in BUILDERS:
        scratch = records[f"{family}_scratch"]
        for variant in VARIANTS:
            rows, fractions = records[f"{family}_{variant}"], []
            for r, s in zip(rows, scratch):
                reach = flops_to_reach(r, s["final_loss"])
                fractions.append(None if reach is None else round(reach / s["flops"][-1], 4))
                g = r["growth"]
                frac = "" if variant == "scratch" else "never" if fractions[-1] is None else f"{fractions[-1]:.3f}"
                table.add_row(
                    family, variant, str(r["seed"]), f"{r['params_before']:,}", f"{r['params_after']:,}",
                    f"{g['loss_before']:.5f} -> {g['loss_after']:.5f}" if g else "", f"{r['final_loss']:.4f}",
                    f"{r['flops'][-1] / 1e12:.3f}", f"{r['wall_s']:.0f}", frac,
                )  # fmt: skip
            if variant == "scratch":
                continue
            known = [f for f in fractions if f is not None]
            settings[f"{family}_{variant}"] = {
                "compute_saved": round(1 - statistics.mean(known), 4) if known and len(known) == len(fractions)
                else None, "fraction": fractions,
                "final_loss_grown": [r["final_loss"] for r in rows],
                "final_loss_scratch": [s["final_loss"] for s in scratch],
                "flops_ratio": round(rows[0]["flops"][-1] / scratch[0]["flops"][-1], 4),
            }  # fmt: skip
    console.print(table)
    return settings


def plot_family(family: str, records: dict[str, list[dict[str, Any]]], path: Path, dpi: int = 80) -> None:
    """Held-out loss against cumulative training FLOPs: scratch, wider and deeper, every seed."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for colour, variant in zip(("C1", "C0", "C2"), VARIANTS):
        for k, r in enumerate(records[f"{family}_{variant}"]):
            ax.plot([f / 1e12 for f in r["flops"]], r["loss"], "-" if k == 0 else "--", marker="o", ms=3,
                    color=colour, label=f"{variant} seed {r['seed']}")  # fmt: skip
            if r["growth"] and k == 0:
                ax.axvline(r["growth"]["train_flops"] / 1e12, color=colour, lw=0.6, ls=":")
    ax.set_xlabel("cumulative training FLOPs (10^12; 3x forward per window)")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title(f"{family}: grown at 25 % (dotted) vs the target from scratch", fontsize=9)
    ax.set_ylim(top=min(max(r["loss"][1] for rs in records.values() for r in rs) + 0.3, 6.0))
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=dpi)


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse exits 2 with this line otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 1, not {text!r}")
    return value


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--lm-steps", type=positive, default=300, help="LM training steps (every run)")
    ap.add_argument("--lm-batch", type=positive, default=16, help="LM windows per step")
    ap.add_argument("--lm-seq", type=positive, default=128, help="LM window length (bytes)")
    ap.add_argument("--lm-lr", type=float, default=2e-3, help="LM peak learning rate")
    ap.add_argument("--lm-eval", type=positive, default=64, help="held-out windows for the LM's eval loss")


def quick(args: argparse.Namespace) -> None:
    args.lm_steps, args.lm_eval = 40, 16


def run_lm(args: argparse.Namespace, seeds: list[int], console: Console) -> dict[str, Any]:
    """Every LM run; the table, one plot per model, and the last line's ``lm_*`` keys."""
    corpus = load_corpus()
    held_out = windows(corpus.held_out, args.lm_eval, args.lm_seq, torch.Generator().manual_seed(SPLIT_SEED))
    print(
        f"LM: stdlib {corpus.files[0]} training files ({len(corpus.train) / 1e6:.1f} MB), {corpus.files[1]} held "
        f"out ({len(corpus.held_out) / 1e6:.1f} MB; {args.lm_eval} windows), {args.lm_steps} steps x "
        f"{args.lm_batch} windows of {args.lm_seq} bytes, AdamW lr {args.lm_lr} warm-up + cosine, seeds {seeds}",
        flush=True,
    )
    start = time.time()
    records: dict[str, list[dict[str, Any]]] = {f"{f}_{v}": [] for f in BUILDERS for v in VARIANTS}
    for seed in seeds:
        for family in BUILDERS:
            for variant in VARIANTS:
                print(f"{family} {variant} seed {seed} ({(time.time() - start) / 60:.1f} min so far)", flush=True)
                record_file = args.out / "lm" / "runs" / f"{family}_{variant}-seed{seed}.json"
                if args.reuse and record_file.is_file():
                    r = dict(json.loads(record_file.read_text()))
                else:
                    r = train_run(family, variant, seed, corpus, held_out, args)
                    atomic_write_text(record_file, json.dumps(r, indent=1) + "\n")
                records[f"{family}_{variant}"].append(r)
                g = r["growth"]
                grown = f"; grown: batch loss {g['loss_before']:.6f} -> {g['loss_after']:.6f}" if g else ""
                print(f"  held-out loss {r['loss'][0]:.3f} -> {r['final_loss']:.4f}, "
                      f"{r['flops'][-1] / 1e12:.3f} TFLOPs, {r['wall_s']:.0f} s{grown}", flush=True)  # fmt: skip
    minutes = round(sum(r["wall_s"] for rs in records.values() for r in rs) / 60, 1)
    settings = summarise(records, console)
    out = args.out / "lm"
    for family in BUILDERS:
        plot_family(family, records, out / f"{family}.png")
    saved = {k: v["compute_saved"] for k, v in settings.items() if v["compute_saved"] is not None}
    best = max(saved, key=lambda k: saved[k]) if saved else None
    detail = {"settings": settings, "args": {k: str(v) for k, v in vars(args).items()}, "runs": records}
    atomic_write_text(out / "growth_training_lm.json", json.dumps(detail, indent=1) + "\n")
    print(f"LM runs {minutes} min; plots and JSON in {out}", flush=True)
    return {
        "lm_compute_saved": saved[best] if best else None, "lm_best_setting": best,
        "lm_settings": {k: {"compute_saved": v["compute_saved"], "fraction": v["fraction"],
                            "final_loss_grown": v["final_loss_grown"], "final_loss_scratch": v["final_loss_scratch"]}
                        for k, v in settings.items()},
        "lm_minutes": minutes,
    }  # fmt: skip
