"""One grammar for model references, parsed here and nowhere else.

=======================  ===============================================================
``resnet50``             a torchvision classification model (random weights)
``timm:NAME``            a timm model
``hf:DIR``               a Hugging Face model saved with ``save_pretrained`` in DIR
``pkg.module:callable``  an nn.Module class or builder (outside the trusted packages only
                         when typed by you or with ``--trust-code``)
``DIR``                  a model or pieces directory saved by ``surgery.save``
``DIR:INDEX``            one piece of a saved pieces directory (``INDEX`` may be negative)
``RUN@0-1``              a path through the cohort of an xross run directory: net 0's
                         first part, then net 1's second part
=======================  ===============================================================

A built model (the first four) may carry constructor arguments as Python literals:
``timm:vit_tiny_patch16_224(img_size=32, patch_size=4)``, ``resnet18(num_classes=10)``.

>>> parse("resnet18(num_classes=10)")
Reference(kind='build', target='resnet18', index=None, path=None, kwargs={'num_classes': 10})
>>> parse("runs/x1@0-1").path, parse("cut-dir:-1").index
((0, 1), -1)
>>> split_references("timm:vit_tiny_patch16_224(img_size=32, patch_size=8),resnet18")
['timm:vit_tiny_patch16_224(img_size=32, patch_size=8)', 'resnet18']
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from surgery.core.errors import SurgeryError
from surgery.core.registry import Registry

RECIPE_FILE = "recipe.json"
RUN_CONFIG = "config.yaml"  # what marks an xross run directory
_CALL = re.compile(r"^(?P<target>[^()]+)\((?P<args>.*)\)$", re.DOTALL)
_PATH = re.compile(r"^(?P<run>.+)@(?P<path>\d+(?:-\d+)+)$")
_PIECE = re.compile(r"^(?P<dir>.+):(?P<index>-?\d+)$")

RunLoader = Callable[..., nn.Module]
RUN_LOADERS: Registry[RunLoader] = Registry("run loader")  # by "module:name"; the last registered answers


@dataclasses.dataclass(frozen=True)
class Reference:
    """A parsed reference: ``kind`` is ``build``, ``saved``, ``piece``, ``run-path`` or ``run`` (a run directory)."""

    kind: str
    target: str
    index: int | None = None
    path: tuple[int, ...] | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _literal_kwargs(text: str, where: str) -> dict[str, Any]:
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise SurgeryError(f"'{where}': the arguments in (...) are not key=value pairs") from None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise SurgeryError(f"'{where}': write the arguments as key=value pairs, e.g. resnet18(num_classes=10)")
    try:
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}  # type: ignore[misc]
    except ValueError:
        raise SurgeryError(
            f"'{where}': argument values must be Python literals (numbers, strings, lists, ...)"
        ) from None


def parse(text: str) -> Reference:
    """Parse a model reference (see the module doc); one-line :class:`SurgeryError` if malformed."""
    text = text.strip()
    if not text:
        raise SurgeryError("an empty model reference; give a model name, a saved directory, DIR:INDEX or RUN@0-1")
    if (m := _PATH.match(text)) and not Path(text).exists():
        return Reference("run-path", m["run"], path=tuple(int(p) for p in m["path"].split("-")))
    if (Path(text) / RECIPE_FILE).is_file():
        return Reference("saved", text)
    if (Path(text) / RUN_CONFIG).is_file():
        return Reference("run", text)
    if (m := _PIECE.match(text)) and not Path(text).exists():  # no callable is named by digits
        return Reference("piece", m["dir"], index=int(m["index"]))
    if (m := _CALL.match(text)) and not Path(text).exists():
        return Reference("build", m["target"].strip(), kwargs=_literal_kwargs(m["args"], text))
    return Reference("build", text)


def split_references(text: str) -> list[str]:
    """Comma-separated references, commas inside ``(...)`` or ``[...]`` kept: ``"a(x=1, y=2),b"`` -> 2 items."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def register_run_loader(fn: RunLoader) -> RunLoader:
    """Register ``fn(run_dir, path, *, trust_code, verify) -> nn.Module`` for ``RUN@0-1`` references (xross does)."""
    return RUN_LOADERS.register(f"{fn.__module__}:{fn.__qualname__}", fn)


def load(
    text: str,
    *,
    trust_code: bool = False,
    trust_typed: bool = True,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    verify: bool = True,
) -> nn.Module:
    """The model a reference names.

    Args:
        text: a reference (see the module doc).
        trust_code: allow code outside the trusted packages named *inside files*
            (saved directories, runs).
        trust_typed: a ``pkg.module:callable`` typed by the user counts as trusted
            (the CLI's arguments); pass False for references read from a file.
        num_classes, weights: for built models (a local state_dict file for ``weights``;
            also loaded into a saved model).
        verify: check the digests of a run's checkpoints (``RUN@...``).
    """
    from surgery.core.plugins import load_plugins
    from surgery.files.io import load as load_dir
    from surgery.models.build import build_model, load_weights

    ref = parse(text)
    if ref.kind == "run":
        raise SurgeryError(
            f"'{text}' is an xross run directory, not one network; name one of its paths, e.g. {text}@0-0"
        )
    if ref.kind == "build" and ("/" in ref.target or ref.target.startswith(".")) and ":" not in ref.target:
        raise SurgeryError(f"'{text}': no such saved model directory (a directory written by surgery.save)")
    if ref.kind == "build":
        kwargs = {"num_classes": num_classes, **ref.kwargs}
        weights = kwargs.pop("weights", weights)  # resnet18(weights="w.safetensors"): a local file
        return build_model(ref.target, weights=weights, trust_code=trust_typed or trust_code, **kwargs)
    if ref.kind == "run-path":
        load_plugins()
        if not RUN_LOADERS:
            raise SurgeryError(f"'{text}' names a path of an xross run, but xross is not installed")
        return RUN_LOADERS.values()[-1](Path(ref.target), ref.path, trust_code=trust_code, verify=verify)
    obj = load_dir(ref.target, trust_code=trust_code)
    if ref.kind == "piece":
        from surgery.pieces.cut import Pieces

        if not isinstance(obj, Pieces):
            raise SurgeryError(f"'{ref.target}' holds a whole model, not pieces; cut it first (surgery cut)")
        index = int(ref.index or 0)  # a piece reference always parses with its index
        if not -len(obj) <= index < len(obj):
            raise SurgeryError(f"'{ref.target}' has {len(obj)} pieces; index {index} is out of range")
        return obj[index]
    if weights is not None:
        load_weights(obj, weights)
    return obj
