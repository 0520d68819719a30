"""Build models by name: every torchvision classification model, or ``package.module:callable``.

>>> from surgery import build_model
>>> net = build_model("resnet18", num_classes=10)
>>> net.surgery_recipe.source
'resnet18'

Weights are never downloaded: pass a local state_dict file (safetensors, or a torch
file read with ``weights_only=True``).
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from surgery._util import first_line
from surgery.errors import SurgeryError, did_you_mean
from surgery.recipe import Recipe, attach_recipe, import_callable


@functools.lru_cache(maxsize=1)
def list_models() -> list[str]:
    """Names of torchvision's classification models (the names ``build_model`` accepts)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


_OWN_PACKAGES = ("surgery.", "growth.", "xross.")


def is_code_source(source: str) -> bool:
    """True for ``package.module:callable`` sources (importing them runs their code)."""
    return ":" in source


def needs_trust(source: str) -> bool:
    """True for code sources outside torchvision and this library (loading them needs trust_code)."""
    return is_code_source(source) and not source.startswith(_OWN_PACKAGES)


def build_model(
    source: str,
    *,
    weights: str | Path | None = None,
    trust_code: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build a model with random (or local-file) weights; it carries a recipe for saving.

    Args:
        source: a torchvision classification model name (``"resnet50"``) or
            ``"package.module:callable"`` returning an ``nn.Module``.
        weights: optional local state_dict file loaded into the model.
        trust_code: allow ``package.module:callable`` sources. Loading a saved recipe
            passes ``False`` unless the caller trusts the directory.
        **kwargs: constructor keyword arguments (``num_classes=10``, ...), recorded in the recipe.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if is_code_source(source):
        if needs_trust(source) and not trust_code:
            raise SurgeryError(
                f"the recipe builds its model with '{source}' (code outside torchvision); "
                "load with trust_code=True (CLI: --trust-code) if you trust where it came from"
            )
        fn = import_callable(source)
    else:
        if source not in list_models():
            raise SurgeryError(
                f"unknown model '{source}'; use a torchvision classification model name or "
                f"'package.module:callable' ({did_you_mean(source, list_models())})"
            )
        fn = functools.partial(torchvision.models.get_model, source, weights=None)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The default weight initialization")
            model = fn(**kwargs)
    except (TypeError, ValueError) as e:
        raise SurgeryError(f"cannot build '{source}' with {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"'{source}' returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return attach_recipe(model, Recipe(source, kwargs))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from safetensors or a torch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"weights file '{path}' does not exist; pass a local state_dict file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise SurgeryError(f"'{path}' is not a readable safetensors file ({e}); it may be truncated") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for bad files
        raise SurgeryError(
            f"'{path}' cannot be read as weights ({first_line(e)}); save a plain state_dict "
            "(safetensors or torch.save(model.state_dict()))"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SurgeryError(f"'{path}' does not hold a state_dict of tensors")
    return obj


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local state_dict file into ``model`` (strict); clear error on mismatch."""
    state = read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    assign_state(model, state, what=f"'{path}'")
    return model


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
        raise SurgeryError(f"weights {what} do not fit the model: {', '.join(parts)}; check the architecture and num_classes")
    model.load_state_dict(state, strict=True)
