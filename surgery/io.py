"""Save and load models and pieces: safetensors weights + a JSON recipe, never pickles.

>>> import tempfile, torch, torchvision, surgery
>>> net = surgery.build_model("resnet18", num_classes=10).eval()
>>> pieces = surgery.cut(net, at="layer2")
>>> d = tempfile.mkdtemp()
>>> _ = surgery.save(pieces, d, force=True)
>>> again = surgery.load(d).eval()
>>> x = torch.randn(1, 3, 32, 32)
>>> torch.equal(again(x), pieces(x))
True

A directory holds ``recipe.json`` (how to rebuild: architecture source, constructor
kwargs, transforms, cut names, versions, the weights' SHA-256) and
``weights.safetensors``. Loading rebuilds the structure from the recipe (re-tracing
and re-cutting), checks the checksum, then loads the weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from surgery._util import atomic_directory
from surgery.cut import META_KEY, Origin, PieceInfo, Pieces, cut, piece_info
from surgery.errors import SurgeryError
from surgery.models import assign_state, needs_trust
from surgery.modspec import module_from_spec, module_spec
from surgery.recipe import Recipe, recipe_of
from surgery.specs import ValueSpec

FORMAT = "surgery/1"
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "weights.safetensors"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("xross-surgery")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        own = "source"
    return {"xross-surgery": own, "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()}


def _no_recipe(what: str) -> SurgeryError:
    return SurgeryError(
        f"cannot save {what}: it was not built by surgery.build_model (or a transform lost its recipe), so "
        "nothing can rebuild it without pickles; build it with surgery.build_model('torchvision_name' or 'pkg.module:callable')"
    )


def _describe_part(part: nn.Module) -> dict[str, Any]:
    meta = getattr(part, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get(META_KEY), PieceInfo):
        info: PieceInfo = meta[META_KEY]
        if info.origin is None or info.origin.recipe is None:
            raise _no_recipe("this piece")
        return {
            "kind": "cut",
            "origin": info.origin.to_json(),
            "in_names": list(info.in_names),
            "out_names": list(info.out_names),
            "in_specs": [s.to_json() for s in info.in_specs] if info.in_specs else None,
            "out_specs": [s.to_json() for s in info.out_specs] if info.out_specs else None,
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
    return {"format": FORMAT, **body, "versions": versions()}


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
        raise SurgeryError(f"output directory '{target}' is not empty; choose another or pass force=True (CLI: --force)")
    return target


def save(obj: nn.Module, directory: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Save a model or :class:`Pieces` to ``directory`` (``recipe.json`` + ``weights.safetensors``).

    A non-empty directory is refused unless ``force``; the files are written to a
    temporary directory first, so an interrupted save never leaves a half-written one.
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


def read_recipe(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and sanity-check ``recipe.json`` of a saved directory."""
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        raise SurgeryError(f"'{directory}' has no {RECIPE_FILE}; it is not a directory saved by surgery.save")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated, save again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SurgeryError(f"{path} is not a {FORMAT} recipe (format={data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("kind") not in ("model", "pieces") or not isinstance(data.get("weights"), dict):
        raise SurgeryError(f"{path} lacks 'kind' or 'weights'; the file is corrupt, save again")
    return data


def _check_trust(data: dict[str, Any], trust_code: bool) -> None:
    sources = []
    if data["kind"] == "model":
        sources.append(Recipe.from_json(data["model"]).source)
    else:
        for p in data.get("pieces", []):
            if isinstance(p, dict) and p.get("kind") == "cut":
                sources.append(Recipe.from_json((p.get("origin") or {}).get("model")).source)
    for s in sources:
        if needs_trust(s) and not trust_code:
            raise SurgeryError(
                f"the recipe builds its model with '{s}' (code outside torchvision); "
                "load with trust_code=True (CLI: --trust-code) if you trust where it came from"
            )


def _read_weights(directory: Path, data: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = data["weights"].get("file", WEIGHTS_FILE)
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        raise SurgeryError(f"recipe names a weights file {name!r} outside its directory; the recipe is corrupt")
    path = directory / name
    if not path.is_file():
        raise SurgeryError(f"'{path}' is missing; copy the whole saved directory")
    if _sha256(path) != data["weights"].get("sha256"):
        raise SurgeryError(f"'{path}' does not match the SHA-256 in {RECIPE_FILE}: it was modified or truncated; save again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SurgeryError(f"'{path}' is not a readable safetensors file ({e})") from None


def _leaf_modules(names: list[str], trust_code: bool) -> list[str | type]:
    from surgery.recipe import import_callable

    out: list[str | type] = []
    for n in names:
        if ":" not in n:
            out.append(n)
        elif n.startswith(("torch", "surgery.", "growth.", "xross.")) or trust_code:
            out.append(import_callable(n))
        else:
            raise SurgeryError(f"leaf module class '{n}' needs trust_code=True to import")
    return out


def _rebuild_part(entry: Any, cache: dict[str, Pieces], trust_code: bool) -> nn.Module:
    if not isinstance(entry, dict):
        raise SurgeryError("a piece entry of the recipe is not an object; the recipe is corrupt")
    if entry.get("kind") == "module":
        return module_from_spec(entry.get("spec"))
    if entry.get("kind") != "cut":
        raise SurgeryError(f"unknown piece kind {entry.get('kind')!r}; the recipe is corrupt")
    origin = entry.get("origin") or {}
    key = json.dumps({k: origin.get(k) for k in ("model", "cuts", "leaf_modules")}, sort_keys=True)
    if key not in cache:
        model = Recipe.from_json(origin.get("model")).build(trust_code=trust_code)
        cache[key] = cut(model, list(origin.get("cuts") or []), leaf_modules=_leaf_modules(origin.get("leaf_modules") or [], trust_code))
    pieces = cache[key]
    index = origin.get("index")
    if not isinstance(index, int) or not 0 <= index < len(pieces):
        raise SurgeryError(f"piece index {index!r} is out of range for cuts {origin.get('cuts')}; the recipe is corrupt")
    part = pieces[index]
    info = piece_info(part)
    if entry.get("in_specs"):
        info.in_specs = tuple(ValueSpec.from_json(s) for s in entry["in_specs"])
    if entry.get("out_specs"):
        info.out_specs = tuple(ValueSpec.from_json(s) for s in entry["out_specs"])
    return part


def load(directory: str | os.PathLike[str], *, trust_code: bool = False) -> nn.Module:
    """Rebuild what :func:`save` wrote: a model or a :class:`Pieces`, on the CPU, in train mode.

    Raises :class:`SurgeryError` for a missing, corrupt, tampered or truncated file, or a
    recipe that needs code outside torchvision when ``trust_code`` is False.
    """
    directory = Path(directory)
    data = read_recipe(directory)
    _check_trust(data, trust_code)
    state = _read_weights(directory, data)
    if data["kind"] == "model":
        obj = Recipe.from_json(data["model"]).build(trust_code=trust_code)
    else:
        cache: dict[str, Pieces] = {}
        entries = data.get("pieces")
        if not isinstance(entries, list) or not entries:
            raise SurgeryError(f"{directory / RECIPE_FILE} lists no pieces; the recipe is corrupt")
        obj = Pieces([_rebuild_part(e, cache, trust_code) for e in entries], data.get("cuts"))
    assign_state(obj, state, what=f"in '{directory}'")
    return obj.train()


__all__ = ["load", "save", "describe", "read_recipe", "Origin"]
