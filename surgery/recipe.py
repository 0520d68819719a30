"""Recipes: how to rebuild a model without unpickling anything.

A :class:`Recipe` names the architecture source (a torchvision model name or a
``"package.module:callable"``), its constructor keyword arguments, and the list of
transforms applied since (``replace``, ``net2wider``, ...). Every transform that
changes a model's structure registers a *replay* function here, so a recipe can
rebuild the exact structure; the weights then come from a safetensors file.

The recipe travels with the module as the attribute ``surgery_recipe``: models made
by :func:`surgery.build_model` carry one, and every library transform returns a model
whose recipe has the transform appended.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from surgery.errors import SurgeryError

RECIPE_ATTR = "surgery_recipe"

Replay = Callable[..., nn.Module]
_REPLAYS: dict[str, Replay] = {}


def register_replay(op: str) -> Callable[[Replay], Replay]:
    """Register ``fn(model, **args) -> model`` that re-applies transform ``op`` from its JSON args."""

    def deco(fn: Replay) -> Replay:
        _REPLAYS[op] = fn
        return fn

    return deco


def _load_transform_providers() -> None:
    # Transforms register themselves when their module is imported.
    import surgery.replace  # noqa: F401

    try:
        import growth.ops  # noqa: F401
    except ImportError:  # pragma: no cover - growth is part of the same distribution
        pass


@dataclasses.dataclass
class Recipe:
    """Architecture source + constructor kwargs + the transforms applied since."""

    source: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    transforms: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def then(self, op: str, **args: Any) -> Recipe:
        """A new recipe with transform ``op(**args)`` appended."""
        return Recipe(self.source, dict(self.kwargs), [*copy.deepcopy(self.transforms), {"op": op, "args": args}])

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "kwargs": self.kwargs, "transforms": self.transforms}

    @classmethod
    def from_json(cls, data: Any) -> Recipe:
        if not isinstance(data, dict) or not isinstance(data.get("source"), str):
            raise SurgeryError("recipe has no 'source' string: the recipe file is corrupt; save the model again")
        kwargs = data.get("kwargs", {})
        transforms = data.get("transforms", [])
        if not isinstance(kwargs, dict) or not isinstance(transforms, list):
            raise SurgeryError("recipe 'kwargs' must be an object and 'transforms' a list: the recipe file is corrupt")
        for t in transforms:
            if not isinstance(t, dict) or not isinstance(t.get("op"), str) or not isinstance(t.get("args", {}), dict):
                raise SurgeryError(f"recipe transform {t!r} is malformed: the recipe file is corrupt")
        return cls(data["source"], kwargs, transforms)

    def build(self, *, trust_code: bool = False) -> nn.Module:
        """Build the source architecture and replay every transform (random weights)."""
        from surgery.models import build_model

        model = build_model(self.source, trust_code=trust_code, **self.kwargs)
        _load_transform_providers()
        for t in self.transforms:
            op = t["op"]
            if op not in _REPLAYS:
                raise SurgeryError(f"recipe uses unknown transform '{op}'; known: {', '.join(sorted(_REPLAYS))}")
            model = _REPLAYS[op](model, **t.get("args", {}))
        attach_recipe(model, self)
        return model


def recipe_of(module: nn.Module) -> Recipe | None:
    """The recipe a module carries, or None for modules the library did not build."""
    r = getattr(module, RECIPE_ATTR, None)
    return r if isinstance(r, Recipe) else None


def attach_recipe(module: nn.Module, recipe: Recipe | None) -> nn.Module:
    """Set (or clear) the recipe a module carries; returns the module."""
    object.__setattr__(module, RECIPE_ATTR, recipe)
    return module


def extend_recipe(result: nn.Module, source: nn.Module, op: str, **args: Any) -> nn.Module:
    """Give ``result`` the recipe of ``source`` followed by ``op(**args)`` (none if source has none)."""
    base = recipe_of(source)
    return attach_recipe(result, base.then(op, **args) if base is not None else None)


def import_callable(spec: str) -> Callable[..., Any]:
    """Resolve ``"package.module:attr.path"`` to the object it names."""
    mod_name, _, attr_path = spec.partition(":")
    if not mod_name or not attr_path:
        raise SurgeryError(f"'{spec}' is not of the form 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise SurgeryError(f"cannot import '{mod_name}' for '{spec}': {e}; install it or fix the name") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise SurgeryError(f"'{mod_name}' has no attribute '{attr_path}'; check the name after ':' in '{spec}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SurgeryError(f"'{spec}' is not callable; name a class or function that returns an nn.Module")
    return obj
