"""Describe small modules as JSON (class + constructor kwargs) and rebuild them safely.

Works for ``torch.nn`` layers (kwargs read back from the module's attributes, checked
by rebuilding), ``nn.Sequential`` of such layers, and the library's own modules
(which define ``spec_kwargs()``). Class names are resolved by :mod:`surgery.core.trust`:
only ``nn.Module`` classes of trusted packages are rebuilt, so a recipe file can never
name arbitrary code.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Protocol, cast

import torch
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.core.trust import Kind, class_name, in_trusted_package, resolve
from surgery.core.util import first_line

_SKIP = {"self", "device", "dtype"}


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


class _Described(Protocol):
    """A module of this library that names its own constructor arguments."""

    def spec_kwargs(self) -> dict[str, Any]: ...


def module_spec(m: nn.Module) -> dict[str, Any]:
    """A JSON description of ``m`` that :func:`module_from_spec` rebuilds (random weights)."""
    cls = type(m)
    path = class_name(cls)
    if not in_trusted_package(cls.__module__):
        raise SurgeryError(
            f"cannot save a {cls.__name__} ({path}) in a recipe: only nn.Module classes of trusted packages "
            "(torch.nn layers, nn.Sequential of them, this library's modules) are rebuilt without running foreign code"
        )
    if cls in (nn.Sequential, nn.ModuleList):
        spec: dict[str, Any] = {"class": path, "children": [module_spec(c) for c in cast("Iterable[nn.Module]", m)]}
    elif hasattr(m, "spec_kwargs"):
        spec = {"class": path, "kwargs": _jsonable(cast(_Described, m).spec_kwargs())}
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


def module_from_spec(spec: Any, *, trust_code: bool = False) -> nn.Module:
    """Rebuild a module from :func:`module_spec` output (nn.Module classes of trusted packages only).

    ``spec`` comes from a file: its shape is checked here (the recipe schema checks it
    too), its class goes through :func:`surgery.core.trust.resolve`, and a constructor that
    refuses the recorded arguments gives a one-line :class:`SurgeryError`.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise SurgeryError(f"module spec {str(spec)[:80]} has no 'class': the recipe file is corrupt")
    unknown = set(spec) - {"class", "kwargs", "children"}
    if unknown:
        raise SurgeryError(
            f"module spec of '{spec['class']}' has unknown field(s) {', '.join(sorted(unknown))}: the recipe is corrupt"
        )
    cls = resolve(spec["class"], kind=Kind.MODULE_CLASS, trust_code=trust_code, what="the module class")
    children = spec.get("children")
    kwargs = spec.get("kwargs") or {}
    if children is not None and not isinstance(children, list) or not isinstance(kwargs, dict):
        raise SurgeryError(f"module spec of '{spec['class']}' needs 'children' as a list and 'kwargs' as an object")
    try:
        if children is not None:
            return cls(*[module_from_spec(c, trust_code=trust_code) for c in children])
        return cls(**{k: _tuples(v) for k, v in kwargs.items()})
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded arguments from a file may break a constructor anywhere
        raise SurgeryError(f"cannot rebuild {spec['class']} with {kwargs}: {first_line(e)}") from None
