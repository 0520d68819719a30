"""``pieces.json``, the manifest of an export directory: each piece's file and the values it takes and gives.

Values are named after the fx values that cross the cut (:class:`surgery.pieces.cut.PieceInfo`);
a value a piece passes on untouched gets the suffix ``.out`` on its way out (ONNX names a
value once). Each is described by its name, per-sample shape and dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.core.schema import read_json_file
from surgery.files.io import versions
from surgery.pieces.cut import piece_info

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
MANIFEST_FILE = "pieces.json"
FORMAT_VERSION = 1


def io_names(piece: nn.Module) -> tuple[list[str], list[str]]:
    """ONNX-safe input and output names of a piece: its ``in_names``/``out_names``, each used once.

    >>> import torch, torchvision, surgery
    >>> pieces = surgery.cut(torchvision.models.resnet18(), ["layer1.0.conv1", "layer1.0.conv2"])
    >>> io_names(pieces[1])   # the block input goes through piece 1 untouched
    (['layer1_0_conv1', 'maxpool'], ['layer1_0_conv2', 'maxpool.out'])
    """
    info = piece_info(piece)
    ins = list(info.in_names)
    taken = set(ins)
    outs = []
    for name in info.out_names:
        new = name
        while new in taken:
            new += ".out"
        taken.add(new)
        outs.append(new)
    return ins, outs


def _value_entries(
    names: Sequence[str], values: Sequence[str], tensors: Sequence[torch.Tensor]
) -> list[dict[str, Any]]:
    return [
        {"name": n, "value": v, "shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
        for n, v, t in zip(names, values, tensors)
    ]


def piece_entry(
    k: int,
    piece: nn.Module,
    path: Path,
    args: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    diff: float | None,
    exporter: str | None,
) -> dict[str, Any]:
    """The manifest entry of piece ``k``, written to ``path``, given ``args`` and giving ``outs``."""
    info, (ins, out_names) = piece_info(piece), io_names(piece)
    entry: dict[str, Any] = {
        "index": k,
        "file": path.name,
        "inputs": _value_entries(ins, info.in_names, args),
        "outputs": _value_entries(out_names, info.out_names, outs),
        "max_abs_diff": diff,
    }
    data = path.with_name(path.name + ".data")
    if data.exists():
        entry["data"] = data.name
    if exporter is not None:
        entry["exporter"] = exporter
    return entry


def write_manifest(
    directory: Path,
    format: str,
    cuts: list[str],
    opset: int | None,
    check: dict[str, Any] | None,
    entries: list[dict[str, Any]],
) -> None:
    """Write ``pieces.json`` into ``directory``."""
    manifest = {
        "format": format,
        "format_version": FORMAT_VERSION,
        "batch": "the first dimension of every input and output (ONNX: named batch); dynamic",
        "chain": "piece k+1 takes the outputs of piece k, in order",
        "cuts": cuts,
        "opset": opset,
        "check": check,
        "versions": versions(),
        "pieces": entries,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``pieces.json`` of an export directory."""
    path = Path(directory) / MANIFEST_FILE
    data = read_json_file(
        path,
        missing=f"'{directory}' has no {MANIFEST_FILE}; it is not a directory written by surgery.export",
        fix="export again",
    )
    if not isinstance(data, dict) or data.get("format") not in FORMATS or not isinstance(data.get("pieces"), list):
        raise SurgeryError(f"{path} is not an export manifest (no known 'format' and 'pieces'); export again")
    return data


def describe_values(values: Sequence[dict[str, Any]]) -> str:
    """``'layer1_0_conv2: 64x8x8, maxpool: 64x8x8'`` for a manifest's inputs or outputs."""
    return ", ".join(f"{v['name']}: {'x'.join(map(str, v['shape'])) or 'scalar'}" for v in values)
