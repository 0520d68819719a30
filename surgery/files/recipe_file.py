"""The declared schema of ``recipe.json``, the file :func:`surgery.save` writes beside the weights.

>>> data = {"format": FORMAT, "format_version": 3, "kind": "model", "model": {"source": "resnet18"},
...         "training": False, "versions": {}, "weights": {"file": "weights.safetensors", "sha256": "0" * 64}}
>>> RecipeFile.read(data, "recipe.json").model.source
'resnet18'
>>> RecipeFile.read({**data, "kind": "pieces"}, "recipe.json")
Traceback (most recent call last):
...
surgery.core.errors.SurgeryError: recipe.json: a 'pieces' recipe needs 'cuts' and a non-empty 'pieces' list; ...

Older versions are read too: version 1 (``"format": "surgery/1"``, no ``format_version``)
and version 2, which recorded no train/eval mode (such files load in eval mode):

>>> old = {k: v for k, v in data.items() if k != "training"} | {"format_version": 2}
>>> RecipeFile.read(old, "recipe.json").training
False
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeInt, model_validator

from surgery.core.recipe import Recipe
from surgery.core.schema import FileModel, parse
from surgery.graph.inputs import InputSpec

FORMAT = "surgery-recipe"
FILE_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # a plain file name inside the saved directory


class SpecEntry(FileModel):
    """A boundary value: ``kind`` ("tensor" or a Python type name), per-sample ``shape`` and ``dtype``."""

    kind: str
    shape: list[NonNegativeInt] | None = None
    dtype: str | None = None


class ModuleSpecEntry(FileModel):
    """A module rebuilt from its class and constructor kwargs, or a container of such modules."""

    class_: str = Field(alias="class")
    kwargs: dict[str, Any] | None = None
    children: list[ModuleSpecEntry] | None = None


class OriginEntry(FileModel):
    """Where a piece came from: the model's recipe, the cut names, its index, how the graph was captured."""

    model: Recipe
    cuts: list[str] = Field(min_length=1)
    index: NonNegativeInt
    leaf_modules: list[str] = Field(default_factory=list)
    tracer: Literal["fx", "export"] = "fx"
    inputs: list[InputSpec] = Field(default_factory=list)  # what torch.export ran on


class CutEntry(FileModel):
    """A piece cut out of a model."""

    kind: Literal["cut"]
    origin: OriginEntry
    in_names: list[str]
    out_names: list[str] = Field(min_length=1)
    in_specs: list[SpecEntry] | None = None
    out_specs: list[SpecEntry] | None = None


class ModuleEntry(FileModel):
    """A plain module between pieces (an adapter)."""

    kind: Literal["module"]
    spec: ModuleSpecEntry


class WeightsEntry(FileModel):
    """The safetensors file beside the recipe and its SHA-256."""

    file: str = Field(pattern=FILE_NAME_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("format") == "surgery/1":
        data["format"] = FORMAT
    return data


def _from_version_2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 recorded no mode: such a file loads in eval mode (what a saved model is used for)."""
    return {**data, "training": False, "mode_exceptions": []}


class RecipeFile(FileModel):
    """``recipe.json``: a whole model (``kind="model"``) or a sequence of pieces (``kind="pieces"``)."""

    upgrades = {1: _from_version_1, 2: _from_version_2}

    format: Literal["surgery-recipe"]
    format_version: Literal[3] = 3
    kind: Literal["model", "pieces"]
    model: Recipe | None = None
    cuts: list[str] | None = None
    pieces: list[Annotated[CutEntry | ModuleEntry, Field(discriminator="kind")]] | None = None
    training: bool  # the saved object's mode: load() gives it back in this mode
    mode_exceptions: list[str] = Field(default_factory=list)  # submodules saved in the other mode
    versions: dict[str, str] = Field(default_factory=dict)
    weights: WeightsEntry

    @model_validator(mode="after")
    def _kind_has_its_fields(self) -> RecipeFile:
        if self.kind == "model" and self.model is None:
            raise ValueError("a 'model' recipe needs 'model'")
        if self.kind == "pieces" and (self.cuts is None or not self.pieces):
            raise ValueError("a 'pieces' recipe needs 'cuts' and a non-empty 'pieces' list")
        return self

    @classmethod
    def read(cls, data: Any, where: str) -> RecipeFile:
        """Validate parsed JSON (upgrading version 1); one-line :class:`SurgeryError` otherwise."""
        return parse(cls, data, where)
