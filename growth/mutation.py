"""Random feasible growth: draw an op by its probability and a site where it applies; log every step; replay.

Each step is one JSON line: the op, its site and arguments (seeds included, so the
step is reproducible), parameters and FLOPs before and after, and the measured max
|change of the output| on a fixed example input.

>>> import random, torchvision, growth
>>> net = torchvision.models.resnet18()
>>> grown, records = growth.mutate(net, steps=2, seed=0)
>>> [r.op for r in records]
['net2wider', 'net2wider']
>>> all(r.max_abs_change < 1e-4 for r in records)
True
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growth.check import cost, output_change
from growth.graphedit import Workbench, default_inputs
from growth.registry import OPS, get_op
from growth.errors import GrowthError


@dataclasses.dataclass
class MutationRecord:
    """One growth step as logged: what was done where, what it cost, how far the output moved."""

    op: str
    site: str
    args: dict[str, Any]
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    max_abs_change: float = 0.0
    step: int = 0
    input_shape: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def probabilities(ops: Iterable[str] | None = None, probs: dict[str, float] | None = None) -> dict[str, float]:
    """The weight of every op to draw from: the registered defaults, restricted to ``ops``, overridden by ``probs``."""
    names = list(ops) if ops is not None else list(OPS)
    for name in [*names, *(probs or {})]:
        get_op(name)
    weights = {name: (probs or {}).get(name, OPS[name].probability) for name in names}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise GrowthError(f"op probabilities must be >= 0 with at least one > 0; got {weights}")
    return {name: w for name, w in weights.items() if w > 0}


def _measured(record: MutationRecord, before: nn.Module, after: nn.Module, inputs: Sequence[torch.Tensor]) -> MutationRecord:
    old, new = cost(before, inputs), cost(after, inputs)
    change = output_change(before, after, inputs)
    return dataclasses.replace(
        record, params_before=old.params, params_after=new.params, flops_before=old.flops, flops_after=new.flops,
        max_abs_change=change.max_abs,
    )


def apply_step(model: nn.Module, record: MutationRecord, example_input: torch.Tensor | None = None) -> tuple[nn.Module, MutationRecord]:
    """Apply the op ``record`` names at its site with its arguments; return the grown model and the measured record."""
    grown = get_op(record.op).apply(model, record.site, record.args, example_input)
    return grown, _measured(record, model, grown, default_inputs(model, example_input))


def random_mutation(
    model: nn.Module,
    rng: random.Random,
    ops: Iterable[str] | None = None,
    probs: dict[str, float] | None = None,
    example_input: torch.Tensor | None = None,
) -> tuple[nn.Module, MutationRecord]:
    """One random feasible growth step: ``(grown model, record)``.

    The op is drawn with weights :func:`probabilities`; an op with no feasible site is
    dropped and another drawn. ``rng`` drives every choice (site, factor, seeds).
    """
    work = Workbench(model, example_input, read_only=True)
    weights = probabilities(ops, probs)
    while weights:
        name = rng.choices(list(weights), weights=list(weights.values()))[0]
        proposal = OPS[name].propose(rng, work)
        if proposal is None:
            del weights[name]
            continue
        site, args = proposal
        shape = list(example_input.shape) if example_input is not None else None
        return apply_step(model, MutationRecord(name, site, args, input_shape=shape), example_input)
    raise GrowthError(f"no growth op among {', '.join(probabilities(ops, probs))} applies anywhere in {type(model).__name__}")


def mutate(
    model: nn.Module,
    steps: int,
    seed: int,
    log: str | os.PathLike[str] | None = None,
    example_input: torch.Tensor | None = None,
    ops: Iterable[str] | None = None,
    probs: dict[str, float] | None = None,
) -> tuple[nn.Module, list[MutationRecord]]:
    """``steps`` random growth steps drawn from ``seed``; each is appended to the JSONL ``log`` as it is done.

    The log starts empty. Returns the grown model and the records; :func:`replay` of the
    log on the same starting model gives bit-identical weights.
    """
    if steps < 0:
        raise GrowthError(f"steps={steps} must be >= 0")
    rng = random.Random(seed)
    op_names = list(ops) if ops is not None else None
    records: list[MutationRecord] = []
    path = Path(log) if log is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    for step in range(steps):
        model, record = random_mutation(model, rng, op_names, probs, example_input)
        record.step = step
        records.append(record)
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps(record.to_json()) + "\n")
    return model, records


_FIELDS = {f.name: f for f in dataclasses.fields(MutationRecord)}


def _record(data: Any, where: str) -> MutationRecord:
    if not isinstance(data, dict):
        raise GrowthError(f"{where}: a log line must be a JSON object; the log is corrupt")
    if not isinstance(data.get("op"), str) or not isinstance(data.get("site"), str) or not isinstance(data.get("args", {}), dict):
        raise GrowthError(f"{where}: needs 'op' and 'site' strings and an 'args' object; the log is corrupt")
    if data["op"] not in OPS:
        raise GrowthError(f"{where}: unknown op '{data['op']}'; known: {', '.join(sorted(OPS))}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise GrowthError(f"{where}: unknown field(s) {', '.join(unknown)}; the log is corrupt")
    return MutationRecord(**data)


def read_log(log: str | os.PathLike[str]) -> list[MutationRecord]:
    """Parse a growth log; a missing, unreadable or corrupt one raises a one-line error naming the line."""
    path = Path(log)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GrowthError(f"cannot read growth log '{path}': {e.strerror if isinstance(e, OSError) else e}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise GrowthError(f"{path}:{number}: not valid JSON ({e.msg}); the log is corrupt") from None
        records.append(_record(data, f"{path}:{number}"))
    return records


def replay(model: nn.Module, log: str | os.PathLike[str] | Sequence[MutationRecord]) -> tuple[nn.Module, list[MutationRecord]]:
    """Re-apply every step of a growth log to ``model``; returns the grown model and freshly measured records."""
    records = read_log(log) if isinstance(log, (str, os.PathLike)) else list(log)
    done = []
    for record in records:
        example = torch.randn(record.input_shape, generator=torch.Generator().manual_seed(0)) if record.input_shape else None
        model, measured = apply_step(model, record, example)
        done.append(measured)
    return model, done
