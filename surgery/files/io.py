"""Save and load models and pieces: safetensors weights + a JSON recipe, never pickles.

>>> import tempfile, torch, torchvision, surgery
>>> net = surgery.build_model("resnet18", num_classes=10).eval()
>>> pieces = surgery.cut(net, at="layer2")
>>> d = tempfile.mkdtemp()
>>> _ = surgery.save(pieces, d, force=True)
>>> again = surgery.load(d)
>>> again.training  # it comes back in the mode it was saved in
False
>>> x = torch.randn(1, 3, 32, 32)
>>> torch.equal(again(x), pieces(x))
True

A directory holds ``recipe.json`` (how to rebuild: architecture source, constructor
kwargs, transforms, cut names, train/eval mode, versions, the weights' SHA-256; its schema is
:class:`surgery.files.recipe_file.RecipeFile`) and ``weights.safetensors``. Loading
validates the recipe, resolves every name in it through :mod:`surgery.core.trust` (code
outside the trusted packages needs ``trust_code=True``), checks the checksum, rebuilds
the structure (re-tracing and re-cutting), then loads the weights. Whatever is wrong
with a directory, loading it raises a one-line :class:`SurgeryError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from surgery.core.errors import SurgeryError, UserError
from surgery.core.modspec import module_from_spec, module_spec
from surgery.core.recipe import recipe_of
from surgery.core.schema import read_json_file
from surgery.core.specs import ValueSpec, known_specs
from surgery.core.trust import Kind, resolve
from surgery.core.util import atomic_directory, first_line
from surgery.files.recipe_file import FORMAT, CutEntry, ModuleEntry, RecipeFile, SpecEntry
from surgery.graph.inputs import Example, vocab_size
from surgery.models.build import assign_state, is_code_source, rebuild
from surgery.models.ecosystems import quiet_hf
from surgery.pieces.cut import META_KEY, Origin, PieceInfo, Pieces, cut, piece_info

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "weights.safetensors"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("xross-surgery")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        own = "source"
    return {
        "xross-surgery": own,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _no_recipe(what: str) -> SurgeryError:
    return SurgeryError(
        f"cannot save {what}: it was not built by surgery.build_model (or a transform lost its recipe), so "
        "nothing can rebuild it without pickles; build it with "
        "surgery.build_model('torchvision_name' or 'pkg.module:callable')"
    )


def _describe_part(part: nn.Module) -> dict[str, Any]:
    meta = getattr(part, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get(META_KEY), PieceInfo):
        info: PieceInfo = meta[META_KEY]
        if info.origin is None or info.origin.recipe is None:
            raise _no_recipe("this piece")
        ins, outs = known_specs(info.in_specs), known_specs(info.out_specs)
        return {
            "kind": "cut",
            "origin": info.origin.to_json(),
            "in_names": list(info.in_names),
            "out_names": list(info.out_names),
            "in_specs": [s.to_json() for s in ins] if ins else None,
            "out_specs": [s.to_json() for s in outs] if outs else None,
        }
    return {"kind": "module", "spec": module_spec(part)}


def describe(obj: nn.Module) -> dict[str, Any]:
    """The JSON recipe of a model or a :class:`Pieces` (without the weights section)."""
    if isinstance(obj, Pieces):
        body: dict[str, Any] = {"kind": "pieces", "cuts": obj.cuts, "pieces": [_describe_part(p) for p in obj]}
    else:
        recipe = recipe_of(obj)
        if recipe is None:
            raise _no_recipe(type(obj).__name__)
        body = {"kind": "model", "model": recipe.to_json()}
    return {
        "format": FORMAT,
        "format_version": RecipeFile.current_version(),
        **body,
        **_mode_of(obj),
        "versions": versions(),
    }


def _mode_of(obj: nn.Module) -> dict[str, Any]:
    """The train/eval mode of ``obj``: its own flag and the submodules whose flag is the other one."""
    return {
        "training": obj.training,
        "mode_exceptions": [name for name, m in obj.named_modules() if name and m.training != obj.training],
    }


def _set_mode(obj: nn.Module, recipe: RecipeFile, where: Path) -> nn.Module:
    """Put ``obj`` in the mode ``recipe`` records (each module's own flag, as it was saved)."""
    obj.train(recipe.training)
    modules = dict(obj.named_modules())
    for name in recipe.mode_exceptions:
        if name not in modules:
            raise SurgeryError(
                f"{where} records the mode of module '{name}', which the rebuilt model has not; "
                "it was saved by another version or is corrupt"
            )
        modules[name].training = not recipe.training
    return obj


def _state_for_safetensors(obj: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in obj.state_dict().items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        if key in seen or not v.is_contiguous():
            v = v.clone()  # safetensors stores each tensor once, contiguous
        seen.add(key)
        state[k] = v.cpu().contiguous()
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def prepare_output_dir(directory: str | os.PathLike[str], force: bool) -> Path:
    """Refuse a non-empty ``directory`` unless ``force``; return it as a Path (not created yet)."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise SurgeryError(f"'{target}' exists and is not a directory; choose another output path")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise SurgeryError(
            f"output directory '{target}' is not empty; choose another or pass force=True (CLI: --force)"
        )
    return target


def save(obj: nn.Module, directory: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Save a model or :class:`Pieces` to ``directory`` (``recipe.json`` + ``weights.safetensors``).

    A non-empty directory is refused unless ``force``; the files are written to a
    temporary directory first, so an interrupted save never leaves a half-written one.

    >>> import tempfile, torch, surgery
    >>> net = surgery.build_model("resnet18", num_classes=10).eval()
    >>> out = surgery.save(surgery.cut(net, "layer2"), tempfile.mkdtemp() + "/r18-cut")
    >>> sorted(p.name for p in out.iterdir())
    ['recipe.json', 'weights.safetensors']
    >>> pieces, x = surgery.load(out), torch.randn(2, 3, 32, 32)
    >>> len(pieces), torch.equal(pieces(x), net(x))
    (2, True)
    """
    from safetensors.torch import save_file

    target = prepare_output_dir(directory, force)
    recipe = describe(obj)

    def fill(tmp: Path) -> None:
        save_file(_state_for_safetensors(obj), str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        recipe["weights"] = {"file": WEIGHTS_FILE, "sha256": _sha256(tmp / WEIGHTS_FILE)}
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")

    atomic_directory(target, fill)
    return target


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], *, force: bool = False) -> Path:
    """A Hugging Face model's own ``save_pretrained`` directory (config + safetensors), written atomically.

    ``from_pretrained`` reads it back with no code from this library; a non-empty
    directory is refused unless ``force``.
    """
    writer = getattr(model, "save_pretrained", None)
    if not callable(writer):
        raise SurgeryError(f"a {type(model).__name__} has no save_pretrained; save it with surgery.save")
    target = prepare_output_dir(directory, force)
    with quiet_hf():
        atomic_directory(target, lambda tmp: writer(str(tmp)))
    return target


def read_recipe(directory: str | os.PathLike[str]) -> RecipeFile:
    """Parse and validate ``recipe.json`` of a saved directory (one-line errors naming the field)."""
    path = Path(directory) / RECIPE_FILE
    data = read_json_file(
        path,
        missing=f"'{directory}' has no {RECIPE_FILE}; it is not a directory saved by surgery.save",
        fix="the file is corrupt or truncated, save again",
    )
    return RecipeFile.read(data, str(path))


def _read_weights(directory: Path, recipe: RecipeFile) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / recipe.weights.file
    if not path.is_file():
        raise SurgeryError(f"'{path}' is missing; copy the whole saved directory")
    if _sha256(path) != recipe.weights.sha256:
        raise SurgeryError(
            f"'{path}' does not match the SHA-256 in {RECIPE_FILE}: it was modified or truncated; save again"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SurgeryError(f"'{path}' is not a readable safetensors file ({first_line(e)})") from None


def _leaf_modules(names: list[str], trust_code: bool) -> list[str | type]:
    """Leaf modules as recorded: module paths stay strings, ``module:Class`` names are resolved as classes."""
    return [
        n if ":" not in n else resolve(n, kind=Kind.MODULE_CLASS, trust_code=trust_code, what="the leaf module")
        for n in names
    ]


def _check_names(recipe: RecipeFile, trust_code: bool) -> None:
    """Resolve every code name of the recipe before anything is built (refusals come first, in one line)."""
    models = (
        [recipe.model]
        if recipe.model is not None
        else [e.origin.model for e in recipe.pieces or [] if isinstance(e, CutEntry)]
    )
    for model in models:
        if is_code_source(model.source):
            resolve(model.source, kind=Kind.MODEL_SOURCE, trust_code=trust_code, what="the model source")
    for entry in recipe.pieces or []:
        if isinstance(entry, CutEntry):
            _leaf_modules(entry.origin.leaf_modules, trust_code)


def _specs(entries: list[SpecEntry] | None) -> tuple[ValueSpec, ...] | None:
    return tuple(ValueSpec.from_json(e.model_dump()) for e in entries) if entries else None


def _rebuild_part(entry: CutEntry | ModuleEntry, cache: dict[str, Pieces], trust_code: bool) -> nn.Module:
    if isinstance(entry, ModuleEntry):
        return module_from_spec(entry.spec.model_dump(by_alias=True, exclude_none=True), trust_code=trust_code)
    origin = entry.origin
    key = origin.model_dump_json(exclude={"index"})
    if key not in cache:
        model = rebuild(origin.model, trust_code=trust_code)
        example = Example.from_specs(origin.inputs, vocab_size(model)) if origin.inputs else None
        if origin.tracer == "export" and example is None:
            raise SurgeryError(
                "a piece captured by torch.export records no inputs to capture it again; the recipe is corrupt"
            )
        leaves = _leaf_modules(origin.leaf_modules, trust_code)
        with warnings.catch_warnings():  # notes about the capture were given when the pieces were cut
            warnings.simplefilter("ignore")
            cache[key] = cut(model, origin.cuts, example, leaf_modules=leaves, tracer=origin.tracer)
    pieces = cache[key]
    if origin.index >= len(pieces):
        raise SurgeryError(f"piece index {origin.index} is out of range for cuts {origin.cuts}; the recipe is corrupt")
    part = pieces[origin.index]
    info = piece_info(part)
    if (entry.in_names, entry.out_names) != (list(info.in_names), list(info.out_names)):
        raise SurgeryError(
            f"piece {origin.index} rebuilt from the recipe takes {list(info.in_names)} and returns "
            f"{list(info.out_names)}, "
            f"but the recipe records {entry.in_names} and {entry.out_names}; it was saved by "
            "another version or is corrupt"
        )
    info.in_specs = _specs(entry.in_specs) or info.in_specs
    info.out_specs = _specs(entry.out_specs) or info.out_specs
    return part


def load(directory: str | os.PathLike[str], *, trust_code: bool = False) -> nn.Module:
    """Rebuild what :func:`save` wrote: a model or a :class:`Pieces`, on the CPU, in the mode it was saved in.

    Every module gets back the ``training`` flag it had when saved (a model saved after
    ``.eval()`` comes back in eval mode: dropout off, BatchNorm using and keeping its
    running statistics). Directories written before the mode was recorded (recipe
    format version 2 and older) load in eval mode.

    Raises a one-line :class:`SurgeryError` for a missing, corrupt, tampered or truncated
    file, or a recipe that names code outside the trusted packages when ``trust_code`` is
    False (see :mod:`surgery.core.trust`): nothing outside them is imported or called then.

    >>> import tempfile, torch, surgery
    >>> net = surgery.build_model("resnet18", num_classes=10).eval()
    >>> loaded = surgery.load(surgery.save(net, tempfile.mkdtemp() + "/r18")).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.equal(loaded(x), net(x))
    True
    """
    directory = Path(directory)
    recipe = read_recipe(directory)
    _check_names(recipe, trust_code)
    state = _read_weights(directory, recipe)
    try:
        if recipe.model is not None:
            obj: nn.Module = rebuild(recipe.model, trust_code=trust_code)
        else:
            cache: dict[str, Pieces] = {}
            obj = Pieces([_rebuild_part(e, cache, trust_code) for e in recipe.pieces or []], recipe.cuts)
    except UserError as e:
        raise SurgeryError(f"{directory / RECIPE_FILE} does not rebuild: {first_line(e)}") from None
    assign_state(obj, state, what=f"in '{directory}'")
    return _set_mode(obj, recipe, directory / RECIPE_FILE)


__all__ = ["load", "save", "describe", "read_recipe", "Origin"]
