"""Model sources from other ecosystems: ``timm:NAME`` and ``hf:DIR`` / ``hf:ClassName`` (optional extras).

* ``timm:NAME`` builds a timm model (``timm.create_model(NAME, pretrained=False, ...)``).
* ``hf:DIR`` loads a Hugging Face model saved with ``save_pretrained`` in a local
  directory: safetensors weights only, never ``trust_remote_code``, no downloads. Its
  recipe embeds the model's config (``hf:ClassName`` with ``config={...}``), not the path.
* ``hf:ClassName`` with ``config={...}`` builds that transformers class from a config
  dict (random weights): how recipes rebuild Hugging Face models.

Each source is a registered builder ``fn(rest, kwargs) -> (model, recipe)``; the classes
named come from the timm and transformers packages themselves.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from surgery.core.errors import SurgeryError, did_you_mean
from surgery.core.recipe import Recipe
from surgery.core.registry import Registry
from surgery.core.util import first_line

Builder = Callable[[str, dict[str, Any]], tuple[nn.Module, Recipe]]
SOURCES: Registry[Builder] = Registry("model source")


def register_source(prefix: str) -> Callable[[Builder], Builder]:
    """Register the builder of ``prefix:...`` model sources (a decorator).

    >>> sorted(SOURCES)
    ['hf', 'timm']
    """
    return SOURCES.register(prefix)


def source_prefix(source: str) -> str | None:
    """``"timm"`` for ``"timm:resnet18"``; None when the source is no ecosystem source."""
    prefix, sep, _ = source.partition(":")
    return prefix if sep and prefix in SOURCES else None


def _require(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SurgeryError(f"{module} is not installed; install it with pip install 'xross-surgery[{extra}]'") from None


@register_source("timm")
def timm_model(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, Recipe]:
    timm = _require("timm", "timm")
    if not timm.is_model(name):
        raise SurgeryError(f"unknown timm model '{name}' ({did_you_mean(name, timm.list_models())})")
    model = timm.create_model(name, pretrained=False, **kwargs)
    return model, Recipe(source=f"timm:{name}", kwargs=kwargs)


def _hf_class(name: str) -> Any:  # a transformers model class (transformers has no type information here)
    transformers = _require("transformers", "hf")
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SurgeryError(
            f"'{name}' is not a transformers model class or a directory saved with save_pretrained; "
            "give a local directory (hf:DIR) or a class such as hf:BertForSequenceClassification"
        )
    return cls


def _config_dict(config: Any) -> dict[str, Any]:
    data = json.loads(config.to_json_string(use_diff=False))
    data.pop("_name_or_path", None)  # a local path is no part of the architecture
    return data


@register_source("hf")
def hf_model(ref: str, kwargs: dict[str, Any]) -> tuple[nn.Module, Recipe]:
    directory = Path(ref)
    if directory.is_dir():
        return _hf_from_directory(directory, kwargs)
    cls = _hf_class(ref)
    config = kwargs.get("config")
    if set(kwargs) != {"config"} or not isinstance(config, dict):
        raise SurgeryError(
            f"hf:{ref} takes one argument, config={{...}} (a config dict); got {', '.join(kwargs) or 'none'}"
        )
    try:
        model = cls(cls.config_class.from_dict(dict(config)))
    except Exception as e:  # noqa: BLE001 - a config from a file may break the constructor anywhere
        raise SurgeryError(f"cannot build hf:{ref} from its config: {first_line(e)}") from None
    return model, Recipe(source=f"hf:{cls.__name__}", kwargs={"config": _config_dict(model.config)})


@contextlib.contextmanager
def _quiet_transformers(transformers: ModuleType) -> Iterator[None]:
    """No progress bars or advice from transformers while it loads a directory (restored afterwards)."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """No progress bars or advice from transformers inside the block (nothing to quiet when it is not installed)."""
    try:
        import transformers
    except ImportError:
        yield
        return
    with _quiet_transformers(transformers):
        yield


def _hf_from_directory(directory: Path, kwargs: dict[str, Any]) -> tuple[nn.Module, Recipe]:
    transformers = _require("transformers", "hf")
    with _quiet_transformers(transformers):
        return _hf_load(transformers, directory, kwargs)


def _hf_load(transformers: ModuleType, directory: Path, kwargs: dict[str, Any]) -> tuple[nn.Module, Recipe]:
    kwargs = dict(kwargs)
    num_classes = kwargs.pop("num_classes", None)  # a classifier's own count (num_labels) is accepted
    if kwargs:
        raise SurgeryError(
            f"hf:{directory} takes no arguments ({', '.join(kwargs)}); its config.json says how to build it"
        )
    if not (directory / "config.json").is_file():
        raise SurgeryError(f"'{directory}' has no config.json; save the model with save_pretrained")
    if not any(directory.glob("*.safetensors")):
        raise SurgeryError(
            f"'{directory}' holds no safetensors weights; save with save_pretrained(safe_serialization=True)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a damaged config.json fails in many ways
        raise SurgeryError(f"cannot read {directory / 'config.json'}: {first_line(e)}") from None
    if num_classes is not None and getattr(config, "num_labels", None) != num_classes:
        raise SurgeryError(
            f"hf:{directory} has {getattr(config, 'num_labels', 'no')} labels (num_labels in its config.json), not "
            f"the {num_classes} classes asked for; save a classifier with num_labels={num_classes}"
        )
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise SurgeryError(
            f"{directory / 'config.json'} names no architecture; save the model itself with save_pretrained"
        )
    cls = _hf_class(architectures[0])
    try:
        model = cls.from_pretrained(directory, local_files_only=True, use_safetensors=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise SurgeryError(f"cannot load {cls.__name__} from '{directory}': {first_line(e)}") from None
    return model, Recipe(source=f"hf:{cls.__name__}", kwargs={"config": _config_dict(model.config)})
