"""``growth mutate MODEL --set KEY=VALUE ...``: the command line of :func:`growth.grow_transformer`.

The keys are the function's own keyword arguments (read from its signature, not
declared again): ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``num_hidden_layers``, ``width``, ``depth``. A Hugging Face
model is written with its own ``save_pretrained`` (config + safetensors), so
``from_pretrained`` loads the grown model with nothing from this library.

    growth mutate hf:small-llama --set width=2 --set num_hidden_layers=8 --out big-llama
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

from torch import nn

from growth.errors import GrowthError
from growth.transformer.grow import Sizes, grow_transformer, output_change, sizes_of
from surgery.channels.layouts import Layout, layout_of
from surgery.cli.kit import console, table
from surgery.core.errors import SurgeryError
from surgery.files.io import save_pretrained
from surgery.graph.flops import count_params, human
from surgery.graph.inputs import Example

_NOT_SIZES = ("seed", "example_input", "check")


def uniform_keys() -> list[str]:
    """The keys ``--set`` takes: grow_transformer's keyword-only arguments that say what to grow."""
    params = inspect.signature(grow_transformer).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _NOT_SIZES]


def parse_uniform(items: list[str], other_options: dict[str, Any]) -> dict[str, int | float]:
    """``KEY=VALUE`` pairs as grow_transformer's arguments; options of ``--op`` given alongside are refused."""
    if other_options:
        shown = ", ".join("--" + k.replace("_", "-") for k in other_options)
        raise GrowthError(f"{shown} does not apply to --set (a uniform growth); drop it or use --op")
    keys, parsed = uniform_keys(), {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; keys: {', '.join(keys)}"
            raise GrowthError(f"--set {item}: expected KEY=VALUE with a key of grow_transformer{hint}")
        try:
            parsed[key] = float(text) if key in ("width", "depth") else int(text)
        except ValueError:
            kind = "a number" if key in ("width", "depth") else "a whole number"
            raise GrowthError(f"--set {item}: {key} takes {kind}") from None
    return parsed


def grow_uniform(net: nn.Module, sizes: dict[str, Any], seed: int, example: Example | None, name: str) -> nn.Module:
    """Grow ``net`` and print its sizes before and after, the parameters and the measured output change."""
    before = sizes_of(net, _layout(net))
    grown = grow_transformer(net, **sizes, seed=seed, example_input=example)
    after = sizes_of(grown, _layout(grown))
    change, scale = output_change(net, grown, example)
    rows = [(field, getattr(before, field), getattr(after, field)) for field in Sizes.__dataclass_fields__]
    rows.append(("parameters", human(count_params(net)), human(count_params(grown))))
    console.print(table(f"grow_transformer on {name}", ["size", "before", "after"], rows))
    console.print(
        f"a {type(grown).__name__} again; max |Δ output| {change:.3g} (max |y| {scale:.3g}, eval mode)",
        highlight=False,
        soft_wrap=True,
    )
    return grown


def save_uniform(grown: nn.Module, out: Path, force: bool) -> None:
    """A Hugging Face model as its own ``save_pretrained`` directory; other families are refused before work."""
    save_pretrained(grown, out, force=force)
    console.print(f"saved to {out}/ ({type(grown).__name__}.from_pretrained loads it)")


def _layout(net: nn.Module) -> Layout:
    try:
        return layout_of(net)
    except SurgeryError as e:
        raise GrowthError(str(e)) from None


def check_saveable(net: nn.Module, out: Path | None) -> None:
    """Refuse ``--out`` for a model without ``save_pretrained`` before any growing."""
    if out is not None and not callable(getattr(net, "save_pretrained", None)):
        raise GrowthError(
            f"--set --out writes a Hugging Face save_pretrained directory; a {type(net).__name__} has none "
            "(grow it from Python with growth.grow_transformer and save it your way)"
        )
