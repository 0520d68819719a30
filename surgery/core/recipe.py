"""Recipes: how to rebuild a model without unpickling anything.

A :class:`Recipe` names the architecture source (a torchvision model name or a
``"package.module:callable"``), its constructor keyword arguments, and the list of
transforms applied since (``replace``, ``net2wider``, ...). Every transform that
changes a model's structure registers a *replay* function here, so a recipe can
rebuild the exact structure; the weights then come from a safetensors file.

The recipe travels with the module as the attribute ``surgery_recipe``: models made
by :func:`surgery.build_model` carry one, and every library transform returns a model
whose recipe has the transform appended. Packages above surgery (``growth``) register
their replays when imported; a recipe that needs them loads them through
:mod:`surgery.core.plugins` (trusted entry points only), so surgery never imports them itself.

>>> r = Recipe(source="resnet18", kwargs={"num_classes": 10}).then("replace", name="fc", module=None)
>>> r.to_json()["transforms"]
[{'op': 'replace', 'args': {'name': 'fc', 'module': None}}]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import Field
from torch import nn

from surgery.core.errors import SurgeryError, UserError, did_you_mean
from surgery.core.plugins import load_plugins
from surgery.core.registry import Registry
from surgery.core.schema import FileModel
from surgery.core.util import first_line

_M = TypeVar("_M", bound=nn.Module)  # attaching a recipe hands back the module as the type it was

RECIPE_ATTR = "surgery_recipe"

Replay = Callable[..., nn.Module]
REPLAYS: Registry[Replay] = Registry("recipe transform")


def register_replay(op: str) -> Callable[[Replay], Replay]:
    """Register ``fn(model, **args) -> model`` that re-applies transform ``op`` from its JSON args (a decorator).

    >>> @register_replay("noop")
    ... def _noop(model: nn.Module) -> nn.Module:
    ...     return model
    >>> "noop" in REPLAYS
    True
    >>> REPLAYS.unregister("noop")
    """
    return REPLAYS.register(op)


class Transform(FileModel):
    """One structural change since the source was built: the op's name and its JSON arguments."""

    op: str
    args: dict[str, Any] = Field(default_factory=dict)


class Recipe(FileModel):
    """Architecture source + constructor kwargs + the transforms applied since.

    >>> import surgery
    >>> r = surgery.recipe_of(surgery.build_model("resnet18", num_classes=10))
    >>> r.source, r.kwargs, r.then("replace", name="fc", module=None).transforms[0].op
    ('resnet18', {'num_classes': 10}, 'replace')
    """

    source: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    transforms: list[Transform] = Field(default_factory=list)

    def then(self, op: str, **args: Any) -> Recipe:
        """A new recipe with transform ``op(**args)`` appended."""
        new = self.model_copy(deep=True)
        new.transforms.append(Transform(op=op, args=args))
        return new

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def replay(model: nn.Module, k: int, t: Transform) -> nn.Module:
    """Apply transform ``t`` (the ``k``-th of a recipe) to ``model`` with its replay; one-line errors."""
    load_plugins()
    where = f"recipe transform {k} ('{t.op}')"
    fn = REPLAYS.find(t.op)
    if fn is None:
        raise SurgeryError(
            f"{where} is unknown here ({did_you_mean(t.op, REPLAYS.names())}); install the package that provides it"
        )
    try:
        inspect.signature(fn).bind(model, **t.args)
    except TypeError as e:
        raise SurgeryError(f"{where} has arguments it does not take ({first_line(e)}); the recipe is corrupt") from None
    try:
        return fn(model, **t.args)
    except UserError as e:
        raise SurgeryError(f"{where} does not apply: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - recorded arguments from a file may break the op anywhere
        raise SurgeryError(
            f"{where} fails on its recorded arguments ({first_line(e)}); the recipe is corrupt"
        ) from None


def recipe_of(module: nn.Module) -> Recipe | None:
    """The recipe a module carries, or None for modules the library did not build.

    >>> import torch, surgery
    >>> surgery.recipe_of(surgery.build_model("resnet18")).source
    'resnet18'
    >>> surgery.recipe_of(torch.nn.Linear(2, 2)) is None  # not built by the library
    True
    """
    r = getattr(module, RECIPE_ATTR, None)
    return r if isinstance(r, Recipe) else None


def attach_recipe(module: _M, recipe: Recipe | None) -> _M:
    """Set (or clear) the recipe a module carries; returns the module."""
    object.__setattr__(module, RECIPE_ATTR, recipe)
    return module


def extend_recipe(result: _M, source: nn.Module, op: str, **args: Any) -> _M:
    """Give ``result`` the recipe of ``source`` followed by ``op(**args)`` (none if source has none)."""
    base = recipe_of(source)
    return attach_recipe(result, base.then(op, **args) if base is not None else None)
