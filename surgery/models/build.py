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

from surgery.core.errors import SurgeryError, UserError, did_you_mean
from surgery.core.recipe import Recipe, attach_recipe, replay
from surgery.core.trust import Kind, resolve
from surgery.core.util import first_line
from surgery.models.ecosystems import SOURCES, source_prefix


@functools.lru_cache(maxsize=1)
def list_models() -> list[str]:
    """Names of torchvision's classification models (the names ``build_model`` accepts).

    >>> import surgery
    >>> "resnet18" in surgery.list_models(), len(surgery.list_models()) > 50
    (True, True)
    """
    return sorted(torchvision.models.list_models(module=torchvision.models))


_DOWNLOADING_KWARGS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")


def is_code_source(source: str) -> bool:
    """True for ``package.module:callable`` sources (importing them runs their code; not ``timm:``/``hf:``)."""
    return ":" in source and source_prefix(source) is None


def _from_ecosystem(prefix: str, source: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, recipe = SOURCES[prefix](source.partition(":")[2], kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a builder given arguments it does not take fails in its own way
        raise SurgeryError(f"cannot build '{source}' with {kwargs}: {first_line(e)}") from None
    return attach_recipe(model, recipe)


def build_model(
    source: str,
    *,
    weights: str | Path | None = None,
    trust_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a model with random (or local-file) weights; it carries a recipe for saving.

    Args:
        source: a torchvision classification model name (``"resnet50"``),
            ``"timm:NAME"``, ``"hf:DIR"`` (a local ``save_pretrained`` directory) or
            ``"hf:ClassName"`` with ``config={...}``, or ``"package.module:callable"``
            returning an ``nn.Module`` (see :mod:`surgery.models.ecosystems`).
        weights: optional local state_dict file loaded into the model.
        trust_code: allow ``package.module:callable`` sources outside torch, torchvision,
            timm, transformers and this library (see :mod:`surgery.core.trust`); pass True for
            names you typed yourself, never for names read from someone else's file.
        **kwargs: constructor keyword arguments (``num_classes=10``, ...), recorded in the recipe.

    >>> import surgery
    >>> net = surgery.build_model("resnet18", num_classes=10)
    >>> net.fc.out_features, surgery.recipe_of(net).kwargs
    (10, {'num_classes': 10})
    >>> vgg = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32)
    >>> vgg.features[1].block.conv
    Conv2d(8, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    """
    model = _construct(source, {k: v for k, v in kwargs.items() if v is not None}, trust_code)
    if weights is not None:
        load_weights(model, weights)
    return model


def _construct(source: str, kwargs: dict[str, Any], trust_code: bool) -> nn.Module:
    """The model ``source`` builds with ``kwargs`` (random weights), carrying its recipe."""
    if not isinstance(source, str) or not source:
        raise SurgeryError(f"a model source must be a non-empty string, not {type(source).__name__}")
    downloading = [k for k in _DOWNLOADING_KWARGS if kwargs.get(k) not in (None, False)]
    if downloading:
        raise SurgeryError(
            f"'{downloading[0]}' would download weights; nothing is downloaded here: build without it and pass a "
            "local state_dict file (weights=..., CLI --weights)"
        )
    prefix = source_prefix(source)
    if prefix is not None:
        return _from_ecosystem(prefix, source, kwargs)
    if is_code_source(source):
        fn = resolve(source, kind=Kind.MODEL_SOURCE, trust_code=trust_code, what="the model source")
    else:
        if source not in list_models():
            raise SurgeryError(
                f"unknown model '{source}'; use a torchvision classification model name or "
                f"'package.module:callable' ({did_you_mean(source, list_models())})"
            )
        fn = functools.partial(torchvision.models.get_model, source, weights=None)
    try:
        with warnings.catch_warnings():  # constructors' chatter (init notes, deprecations) is not the user's business
            warnings.simplefilter("ignore")
            model = fn(**kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a builder given arguments it does not take fails in its own way
        raise SurgeryError(f"cannot build '{source}' with {kwargs}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"'{source}' returned {type(model).__name__}, not an nn.Module")
    return attach_recipe(model, Recipe(source=source, kwargs=kwargs))


def rebuild(recipe: Recipe, *, trust_code: bool = False) -> nn.Module:
    """Build ``recipe``'s source architecture and replay every transform (random weights).

    A transform this installation does not know, or whose recorded arguments do not
    apply, is a one-line :class:`SurgeryError` naming it.
    """
    model = _construct(recipe.source, recipe.kwargs, trust_code)
    for k, t in enumerate(recipe.transforms):
        model = replay(model, k, t)
    return attach_recipe(model, recipe)


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
    """Load a local state_dict file into ``model`` (strict); clear error on mismatch.

    >>> import tempfile, torch, surgery
    >>> path = tempfile.mkdtemp() + "/r18.pt"
    >>> trained = surgery.build_model("resnet18", num_classes=10)
    >>> torch.save(trained.state_dict(), path)
    >>> net = surgery.load_weights(surgery.build_model("resnet18", num_classes=10), path)
    >>> torch.equal(net.fc.weight, trained.fc.weight)
    True
    """
    state = read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    assign_state(model, state, what=f"'{path}'")
    return model


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
        raise SurgeryError(
            f"weights {what} do not fit the model: {', '.join(parts)}; check the architecture and num_classes"
        )
    model.load_state_dict(state, strict=True)
