"""Growth during training: the schedule a run config gives (``--grow``) and the log a run keeps of its growths.

One schedule item is ``WHEN:OP:SITES[:ARG=VALUE,...]``:

- ``WHEN``: a fraction of the run's steps (``0.25``), ``epoch=E`` (before epoch E+1's first step) or
  ``step=S`` (before global step S+1);
- ``OP``: a growth op (``growth.OPS``: net2wider, net2deeper, net2branch, ...; ``any`` with ``random:N``);
- ``SITES``: a policy (``all``, ``stages``, ``random:N``) or site names joined by ``+``
  (:func:`growth.expand` says what each means);
- the op's own arguments (``factor=2``, ``noise=0.01``, ``kind=block``), and ``net=I`` to grow only
  net I of a cohort (default: every net).

>>> item = parse_item("0.25:net2wider:all:factor=2")
>>> item.op, item.sites, item.args, item.step_of(total=400, steps_per_epoch=100)
('net2wider', 'all', {'factor': 2}, 100)
>>> parse_item("epoch=2:net2deeper:stages").step_of(total=400, steps_per_epoch=100)
200
>>> parse_item("0.5:net2wider")
Traceback (most recent call last):
...
ValueError: '0.5:net2wider' is WHEN:OP:SITES[:ARG=VALUE,...], e.g. 0.25:net2wider:all:factor=2
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from growth.mutation import MutationRecord
from growth.registry import OPS
from surgery.core.schema import FileModel, Float
from surgery.core.util import atomic_write_text

EXAMPLE = "0.25:net2wider:all:factor=2"
RESERVED = ("net",)  # schedule arguments that are not the op's


@dataclass(frozen=True)
class GrowthItem:
    """One parsed schedule item (``text`` as given); ``at``: ``("fraction", f)``, ``("epoch", E)``, ``("step", S)``."""

    text: str
    at: tuple[str, float]
    op: str
    sites: str
    args: dict[str, Any] = field(default_factory=dict)
    net: int | None = None

    def step_of(self, total: int, steps_per_epoch: int) -> int:
        """The global step before which this growth happens."""
        kind, value = self.at
        if kind == "fraction":
            return int(round(value * total))
        return int(value) * steps_per_epoch if kind == "epoch" else int(value)


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _when(text: str, item: str) -> tuple[str, float]:
    kind, eq, value = text.partition("=")
    try:
        if not eq:
            fraction = float(text)
            if not 0 < fraction < 1:
                raise ValueError
            return "fraction", fraction
        if kind in ("epoch", "step") and int(value) >= 0:
            return kind, int(value)
    except ValueError:
        pass
    raise ValueError(f"'{item}': when '{text}' is a fraction of the run in (0, 1), epoch=E or step=S; e.g. {EXAMPLE}")


def parse_item(text: str) -> GrowthItem:
    """A schedule item from its text; ``ValueError`` with one line naming what is wrong."""
    parts = text.split(":")
    if len(parts) < 3 or not all(parts[:3]):
        raise ValueError(f"'{text}' is WHEN:OP:SITES[:ARG=VALUE,...], e.g. {EXAMPLE}")
    at = _when(parts[0], text)
    op, sites, rest = parts[1], parts[2], parts[3:]
    if op != "any" and op not in OPS:
        raise ValueError(f"'{text}': unknown op '{op}'; known: {', '.join(sorted(OPS))} (any with random:N)")
    if sites == "random":
        if not rest or not rest[0].isdigit() or int(rest[0]) < 1:
            raise ValueError(f"'{text}': random growth is random:N with N >= 1 steps")
        sites, rest = f"random:{rest[0]}", rest[1:]
    if len(rest) > 1:
        raise ValueError(f"'{text}': give the op's arguments as one ARG=VALUE,ARG=VALUE list")
    args: dict[str, Any] = {}
    for pair in rest[0].split(",") if rest and rest[0] else []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"'{text}': argument '{pair}' is not ARG=VALUE")
        args[key] = _value(value)
    net = args.pop("net", None)
    if net is not None and (not isinstance(net, int) or net < 0):
        raise ValueError(f"'{text}': net={net} names a net by its index 0, 1, ...")
    return GrowthItem(text, at, op, sites, args, net)


class GrowthEntry(FileModel):
    """One growth as the run's log (``growth.jsonl``, and every checkpoint) records it.

    ``steps``: per net grown, the explicit steps applied (op, site, arguments: enough to replay);
    ``loss_before``/``loss_after``: each net's cross-entropy on the batch of that step, in eval mode, just
    before and just after; ``max_logit_change``: over every path trained, relative to the largest logit.
    """

    item: str
    global_step: int
    nets: dict[int, list[dict[str, Any]]]
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0  # forward FLOPs per sample of everything trained
    flops_after: int = 0
    loss_before: dict[int, Float] = {}
    loss_after: dict[int, Float] = {}
    max_logit_change: Float = 0.0
    optimizer: str = "carry"
    init: str = "copy"

    def steps(self) -> dict[int, list[MutationRecord]]:
        """Per net grown, the steps to replay."""
        return {net: [MutationRecord.model_validate(r) for r in records] for net, records in self.nets.items()}


def write_log(run_dir: Path, entries: list[GrowthEntry]) -> None:
    """``run_dir/growth.jsonl``: one entry per growth so far (written whole, atomically)."""
    atomic_write_text(run_dir / "growth.jsonl", "".join(json.dumps(e.model_dump(mode="json")) + "\n" for e in entries))


def read_log(run_dir: Path) -> list[GrowthEntry]:
    """The growths of a run directory (none for a run that did not grow)."""
    path = Path(run_dir) / "growth.jsonl"
    if not path.is_file():
        return []
    return [GrowthEntry.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_growth(state: dict[str, Any]) -> list[GrowthEntry]:
    """The growths a checkpoint's weights were saved after (none in a run that did not grow, or an older one)."""
    return [GrowthEntry.model_validate(entry) for entry in state.get("growth", [])]
