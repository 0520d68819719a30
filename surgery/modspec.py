"""Describe small modules as JSON (class + constructor kwargs) and rebuild them safely.

Works for ``torch.nn`` layers (kwargs read back from the module's attributes, checked
by rebuilding), ``nn.Sequential`` of such layers, and the library's own modules
(which define ``spec_kwargs()``). Only classes from torch, torchvision.ops and this
library are rebuilt, so a recipe file can never name arbitrary code.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError

_ALLOWED = ("torch.nn.", "torchvision.ops.", "surgery.", "growth.", "xross.")
_SKIP = {"self", "device", "dtype"}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _jsonable(x) for k, x in v.items()}
    raise TypeError(type(v).__name__)


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _kwargs_from_attributes(m: nn.Module) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, p in inspect.signature(type(m)).parameters.items():
        if name in _SKIP or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not hasattr(m, name):
            continue
        value = getattr(m, name)
        if name == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        try:
            kwargs[name] = _jsonable(value)
        except TypeError:
            raise SurgeryError(
                f"cannot describe {type(m).__name__} as JSON (argument '{name}' is a {type(value).__name__}); "
                "use torch.nn layers or an nn.Sequential of them"
            ) from None
    return kwargs


def module_spec(m: nn.Module) -> dict[str, Any]:
    """A JSON description of ``m`` that :func:`module_from_spec` rebuilds (random weights)."""
    cls = type(m)
    path = _class_path(cls)
    if not path.startswith(_ALLOWED):
        raise SurgeryError(
            f"cannot save a {cls.__name__} ({path}) in a recipe: only torch.nn layers, nn.Sequential of them "
            "and this library's modules are rebuilt without running foreign code"
        )
    if cls in (nn.Sequential, nn.ModuleList):
        spec: dict[str, Any] = {"class": path, "children": [module_spec(c) for c in m]}
    elif hasattr(m, "spec_kwargs"):
        spec = {"class": path, "kwargs": _jsonable(m.spec_kwargs())}
    else:
        if any(True for _ in m.children()):
            raise SurgeryError(f"cannot describe {cls.__name__} (it has submodules); use an nn.Sequential of layers")
        spec = {"class": path, "kwargs": _kwargs_from_attributes(m)}
    rebuilt = module_from_spec(spec)
    if repr(rebuilt) != repr(m) or _shapes(rebuilt) != _shapes(m):
        raise SurgeryError(f"cannot describe {cls.__name__} faithfully as JSON: rebuilt {rebuilt!r} differs from {m!r}")
    return spec


def _shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def module_from_spec(spec: Any) -> nn.Module:
    """Rebuild a module from :func:`module_spec` output (allowed classes only)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise SurgeryError(f"module spec {spec!r} has no 'class': the recipe file is corrupt")
    path = spec["class"]
    if not path.startswith(_ALLOWED) or ":" not in path:
        raise SurgeryError(f"module class '{path}' is not allowed in a recipe (only torch.nn, torchvision.ops and this library)")
    mod_name, _, qual = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise SurgeryError(f"module class '{path}' does not exist in this installation; check versions") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise SurgeryError(f"'{path}' is not an nn.Module class")
    if "children" in spec:
        return obj(*[module_from_spec(c) for c in spec["children"]])
    kwargs = {k: _tuples(v) for k, v in (spec.get("kwargs") or {}).items()}
    try:
        return obj(**kwargs)
    except (TypeError, ValueError) as e:
        raise SurgeryError(f"cannot rebuild {path} with {kwargs}: {e}") from None
