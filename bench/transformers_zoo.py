"""Cut and grow transformer families from Hugging Face transformers and timm (small configs, random weights).

For each model: capture it (the library picks fx or torch.export), cut it at every layer
boundary at once (N layers -> N+1 pieces) and check the pieces reproduce the model bit for
bit on inputs of another batch size and length than captured; time the cut against the
capture it rests on, ``torch.export.export(model, args, kwargs, strict=False)`` with every
input dimension dynamic (``Dim.AUTO``, as the library exports), median of 3 (in brackets the same
ratio of the process's CPU seconds, steadier on a shared machine); grow it with net2wider (at the
first site found, factor 2) and net2deeper (a zero-branch copy of a middle layer) and
check the output stays within 1e-5 x max |output|. Weights that start constant (unit
norms, zero heads) are first given random values so no layer hides.

Two columns check the pieces the way users get and call them. "called like the model": cut
at the same points with no example (the library guesses one), then call the pieces on the
family's own input at batch 1 the model's minimal way, ``pieces(x)`` with the main input
alone (positional), and with every input by keyword (``input_ids=, attention_mask=``, a padded
end) where the model takes several; each must equal the model called the same way. "other
length": those pieces, called both ways, at another batch size and sequence length (image
size, audio length); a size the model itself refuses is noted and skipped. "yes" is bit for
bit (``torch.equal``), "close" within the tolerance above, "NO" a miss; every miss is
named with its reason under the table.

Two columns grow the whole model with ``growth.grow_transformer`` (bench/zoo_transformer_growth.py):
"heads", twice the heads at a fixed head size (GPT-2/BERT-style configs: hidden x2 with them; configs with a
``head_dim``: the heads only, key-value heads x2 too), "yes" within 1e-5 x max |output|; "HF class kept",
``width=2`` returns the model's own class and ``save_pretrained`` -> ``from_pretrained`` gives identical
logits. A refusal (a family without a transformer layout, a size the family cannot take) is "no" with its
one-line reason under the table.

    python bench/transformers_zoo.py                 # every family below
    python bench/transformers_zoo.py --models gpt2,bert
    python bench/transformers_zoo.py --real-size     # GPT-2 124M, a 1.1B LLaMA, ViT-B/16 (see zoo_real_size.py)

Last line: {"models": N, "exact": E, "median_cut_over_capture": r, "wider_preserves": w, "deeper_preserves": d,
"median_cut_over_capture_cpu": rc, "called_like_model": c, "called_like_model_close": cc, "other_length": o,
"other_length_close": oc, "heads_preserves": h, "hf_class_kept": k}
(--real-size: {"real_size": true, "models": {...}, "median_cut_over_export": r, "max_grow_s": s,
"max_peak_over_params": m, ...}).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
import zoo_real_size as real
import zoo_transformer_growth as whole
from rich.console import Console
from rich.table import Table
from zoo_calls import TOLERANCE, called_like_the_model, error_line, first_tensor

import growth
import surgery
from growth.check import output_change, vary_constant_weights
from surgery.graph.inputs import Example
from surgery.graph.names import GraphIndex
from surgery.graph.torch_export import dynamic_shapes

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
TEXT = {
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 256,
}


def _text(batch: int, length: int) -> Example:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return Example((), {"input_ids": torch.randint(1, 256, (batch, length)), "attention_mask": mask})


def _pixels(side: int) -> Callable[[int, int], Example]:
    return lambda batch, _: _hf_pixels(batch, side)


def _hf_pixels(batch: int, side: int) -> Example:
    return Example((), {"pixel_values": torch.randn(batch, 3, side, side)})


def _timm_pixels(side: int) -> Callable[[int, int], Example]:
    return lambda batch, _: _positional_pixels(batch, side)


def _positional_pixels(batch: int, side: int) -> Example:
    return Example((torch.randn(batch, 3, side, side),), {})


def _samples(batch: int, length: int) -> Example:
    return Example((), {"input_values": torch.randn(batch, length)})


def _mels(batch: int, frames: int) -> Example:
    return Example((), {"input_features": torch.randn(batch, 16, frames)})


@dataclass
class Family:
    name: str
    source: str
    kwargs: dict[str, Any]
    layers: str  # the container of the layer stack
    example: Callable[[int, int], Example]
    lengths: tuple[int, int] = (12, 9)
    sized: Callable[[int, int], Example] = _text  # the inputs at (batch, length or side), for the two call columns
    other_sizes: tuple[tuple[int, int], ...] = ((3, 9), (2, 23))  # (batch, length or side) of "other length"


def _hf(cls: str, **config: Any) -> tuple[str, dict[str, Any]]:
    return f"hf:{cls}", {"config": config}


FAMILIES = [
    Family(
        "gpt2",
        *_hf("GPT2LMHeadModel", n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64),
        "transformer.h",
        _text,
    ),
    Family("llama", *_hf("LlamaForCausalLM", **TEXT, num_key_value_heads=2), "model.layers", _text),
    Family(
        "mistral", *_hf("MistralForCausalLM", **TEXT, num_key_value_heads=2, sliding_window=None), "model.layers", _text
    ),
    Family("qwen2", *_hf("Qwen2ForCausalLM", **TEXT, num_key_value_heads=2), "model.layers", _text),
    Family(
        "opt",
        *_hf(
            "OPTForCausalLM",
            num_hidden_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            ffn_dim=128,
            vocab_size=256,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        ),
        "model.decoder.layers",
        _text,
    ),
    Family("gpt_neox", *_hf("GPTNeoXForCausalLM", **TEXT), "gpt_neox.layers", _text),
    Family("phi", *_hf("PhiForCausalLM", **TEXT), "model.layers", _text),
    Family("gemma", *_hf("GemmaForCausalLM", **TEXT, num_key_value_heads=2, head_dim=16), "model.layers", _text),
    Family("qwen3", *_hf("Qwen3ForCausalLM", **TEXT, num_key_value_heads=2, head_dim=16), "model.layers", _text),
    Family(
        "bloom", *_hf("BloomForCausalLM", n_layer=4, hidden_size=64, n_head=4, vocab_size=256), "transformer.h", _text
    ),
    Family("starcoder2", *_hf("Starcoder2ForCausalLM", **TEXT, num_key_value_heads=2), "model.layers", _text),
    Family(
        "mamba",  # a state-space model: no attention, a scan over the sequence
        *_hf(
            "MambaForCausalLM", num_hidden_layers=4, hidden_size=64, intermediate_size=128, state_size=8, vocab_size=256
        ),
        "backbone.layers",
        _text,
    ),
    Family("bert", *_hf("BertForSequenceClassification", **TEXT, num_labels=3), "bert.encoder.layer", _text),
    Family(
        "roberta",
        *_hf("RobertaForSequenceClassification", **TEXT, num_labels=3, max_position_embeddings=66),
        "roberta.encoder.layer",
        _text,
    ),
    Family(
        "vit (hf)",
        *_hf(
            "ViTForImageClassification",
            **{k: v for k, v in TEXT.items() if k != "vocab_size"},
            image_size=32,
            patch_size=8,
            num_labels=10,
        ),
        "vit.layers",
        _pixels(32),
        sized=_hf_pixels,
        other_sizes=((3, 32), (2, 48)),
    ),
    Family(
        "wav2vec2",
        *_hf(
            "Wav2Vec2ForSequenceClassification",
            **{k: v for k, v in TEXT.items() if k != "vocab_size"},
            do_stable_layer_norm=True,
            feat_extract_norm="layer",
            num_labels=3,
            conv_dim=(32, 32),
            conv_stride=(5, 4),
            conv_kernel=(10, 8),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        ),
        "wav2vec2.encoder.layers",
        lambda batch, _: _samples(batch, 1600),
        sized=_samples,
        other_sizes=((3, 8000), (2, 24000)),
    ),
    Family(
        "whisper",
        *_hf(
            "WhisperForAudioClassification",
            d_model=64,
            encoder_layers=4,
            encoder_attention_heads=4,
            encoder_ffn_dim=128,
            num_mel_bins=16,
            max_source_positions=32,
            num_labels=3,
        ),
        "encoder.layers",
        lambda batch, _: _mels(batch, 64),
        sized=_mels,
        other_sizes=((3, 64), (2, 96)),
    ),
    Family(
        "t5 encoder",
        *_hf("T5EncoderModel", num_layers=4, d_model=64, d_kv=16, num_heads=4, d_ff=128, vocab_size=256),
        "encoder.block",
        _text,
    ),
    Family(
        "vit (timm)",
        "timm:vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 4},
        "blocks",
        _timm_pixels(32),
        sized=_positional_pixels,
        other_sizes=((3, 32), (2, 48)),
    ),
    Family(
        "deit (timm)",
        "timm:deit_tiny_distilled_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 4},
        "blocks",
        _timm_pixels(32),
        sized=_positional_pixels,
        other_sizes=((3, 32), (2, 48)),
    ),
    Family(
        "swin (timm)",
        "timm:swin_tiny_patch4_window7_224",
        {"img_size": 56, "window_size": 7, "depths": (2, 2), "num_heads": (2, 4), "embed_dim": 32},
        "layers",
        _timm_pixels(56),
        sized=_positional_pixels,
        other_sizes=((3, 56), (2, 84)),
    ),
]


@dataclass
class Result:
    layers: int = 0
    exact: bool = False
    cut_s: float = 0.0
    export_s: float = 0.0
    cut_cpu: float = 0.0
    export_cpu: float = 0.0
    tracer: str = ""
    called: str = "-"
    other: str = "-"
    wider: str = "-"
    deeper: str = "-"
    heads: str = "-"
    class_kept: str = "-"
    notes: list[str] = field(default_factory=list)


def _median_time(fn: Callable[[], Any], runs: int = 3) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of ``runs`` calls of ``fn``."""
    return real.median_times([real.timed(fn) for _ in range(runs)])


def _grow(name: str, model: torch.nn.Module, example: Example, op: str, result: Result) -> str:
    try:
        if op == "net2wider":
            sites = growth.sites(model, "net2wider", example_input=example)
            if not sites:
                return "no site"
            grown = growth.net2wider(model, sites[0], factor=2.0, seed=0, example_input=example)
            where = sites[0]
        else:
            sites = growth.sites(model, "net2deeper", example_input=example, kind="block")
            if not sites:
                return "no site"
            where = sites[len(sites) // 2]
            grown = growth.net2deeper(model, where, kind="block", example_input=example)
        change = output_change(model, grown, example)
    except Exception as e:  # noqa: BLE001 - a bench records failures instead of stopping
        result.notes.append(f"{op}: {type(e).__name__}: {str(e)[:200]}")
        return "error"
    if change.max_abs <= TOLERANCE * change.scale:
        return f"ok ({where})"
    result.notes.append(f"{op} at {where}: output moved by {change.relative:.1e} of max |y|")
    return "moved"


def bench(family: Family) -> Result:
    result = Result()
    torch.manual_seed(0)
    model = surgery.build_model(family.source, **family.kwargs).eval()
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # as captured: a cache object is no tensor to hand on
    vary_constant_weights(model, torch.Generator().manual_seed(0))
    example = family.example(2, family.lengths[0])
    other = family.example(3, family.lengths[1])
    capture = surgery.capture(model, example, quiet=True)
    index = GraphIndex(capture.graph)
    layers = sorted(
        (
            p
            for p in index.module_calls
            if p.startswith(family.layers + ".") and p.count(".") == family.layers.count(".") + 1
        ),
        key=lambda p: max(index.module_calls[p][-1]),
    )
    cuts = layers[:-1] or layers
    result.layers, result.tracer = len(layers), capture.tracer
    pieces = surgery.cut(model, cuts, example)
    try:
        with torch.no_grad():
            result.exact = torch.equal(first_tensor(other(pieces)), first_tensor(other(model)))
    except Exception as e:  # noqa: BLE001 - a bench records failures instead of stopping
        result.notes.append(f"exact: on {other.describe()}: {error_line(e)}")
    own = family.example(1, family.lengths[0])
    calls = called_like_the_model(model, cuts, own, [family.sized(*size) for size in family.other_sizes], pieces)
    result.called, result.other = calls.called, calls.other
    result.notes += calls.notes
    result.cut_s, result.cut_cpu = _median_time(lambda: surgery.cut(model, cuts, example))
    dynamic = dynamic_shapes(example)
    result.export_s, result.export_cpu = _median_time(
        lambda: torch.export.export(model, example.args, example.kwargs, dynamic_shapes=dynamic, strict=False)
    )
    result.wider = _grow(family.name, model, example, "net2wider", result)
    result.deeper = _grow(family.name, model, example, "net2deeper", result)
    for column, check in (("heads", whole.heads_column), ("class_kept", whole.class_kept_column)):
        value, note = check(model, example)
        setattr(result, column, value)
        result.notes += [note] if note else []
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated family names (default: all)")
    parser.add_argument(
        "--real-size", action="store_true", help="GPT-2 124M, a 1.1B LLaMA, ViT-B/16 instead (zoo_real_size.py)"
    )
    args = parser.parse_args()
    if args.real_size:
        names = args.models.split(",") if args.models else list(real.MODELS)
        unknown = sorted(set(names) - set(real.MODELS))
        if unknown:
            parser.error(f"--real-size knows {', '.join(real.MODELS)}; not {', '.join(unknown)}")
        print(json.dumps(real.run_all(names, print)))
        return
    chosen = [f for f in FAMILIES if not args.models or f.name.split(" ")[0] in args.models.split(",")]
    console = Console(width=200)
    results: dict[str, Result] = {}
    for family in chosen:
        start = time.perf_counter()
        try:
            results[family.name] = bench(family)
        except Exception as e:  # noqa: BLE001
            results[family.name] = Result(notes=[f"{type(e).__name__}: {str(e)[:300]}"])
        r = results[family.name]
        console.print(
            f"{family.name}: {time.perf_counter() - start:.1f} s; exact {'yes' if r.exact else 'NO'}, "
            f"called like the model {r.called}, other length {r.other}, {len(r.notes)} notes",
            highlight=False,
        )
    table = Table(title="transformer families: cut at every layer, grow (float32, eval)", header_style="bold")
    columns = ("model", "tracer", "layers", "exact", "called like the model", "other length", "cut s", "export s")
    for column in (*columns, "cut/export (cpu)", "net2wider", "net2deeper", "heads", "HF class kept"):
        table.add_column(
            column, justify="right" if column in ("layers", "cut s", "export s", "cut/export (cpu)") else "left"
        )
    for name, r in results.items():
        ratio = r.cut_s / r.export_s if r.export_s else float("nan")
        table.add_row(
            name,
            r.tracer,
            str(r.layers),
            "yes" if r.exact else "NO",
            r.called,
            r.other,
            f"{r.cut_s:.2f}",
            f"{r.export_s:.2f}",
            f"{ratio:.2f} ({r.cut_cpu / r.export_cpu if r.export_cpu else float('nan'):.2f})",
            r.wider,
            r.deeper,
            r.heads,
            r.class_kept,
        )
    console.print(table)
    for name, r in results.items():
        for note in r.notes:
            console.print(f"[yellow]{name}[/] {note}", highlight=False)
    ratios = [r.cut_s / r.export_s for r in results.values() if r.export_s]
    cpu_ratios = [r.cut_cpu / r.export_cpu for r in results.values() if r.export_cpu]
    print(
        json.dumps(
            {
                "models": len(results),
                "exact": sum(r.exact for r in results.values()),
                "median_cut_over_capture": round(statistics.median(ratios), 3) if ratios else None,
                "median_cut_over_capture_cpu": round(statistics.median(cpu_ratios), 3) if cpu_ratios else None,
                "wider_preserves": sum(r.wider.startswith("ok") for r in results.values()),
                "deeper_preserves": sum(r.deeper.startswith("ok") for r in results.values()),
                "called_like_model": sum(r.called.startswith("yes") for r in results.values()),
                "called_like_model_close": sum(r.called.startswith("close") for r in results.values()),
                "other_length": sum(r.other.startswith("yes") for r in results.values()),
                "other_length_close": sum(r.other.startswith("close") for r in results.values()),
                "heads_preserves": sum(r.heads.startswith("yes") for r in results.values()),
                "hf_class_kept": sum(r.class_kept == "yes" for r in results.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
