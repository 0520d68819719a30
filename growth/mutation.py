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

import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field, NonNegativeInt, PositiveInt
from torch import nn

from growth.check import cost, output_change
from growth.errors import GrowthError
from growth.graphedit import Workbench, default_inputs, input_record
from growth.registry import OPS, get_op
from surgery.core.errors import SurgeryError, UserError
from surgery.core.schema import FileModel, Float, parse
from surgery.core.util import first_line
from surgery.graph.inputs import Example, InputSpec, check_example_size

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model``: names, dtypes, shapes and bytes, in name order.

    >>> import torch
    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> weights_digest(a) == weights_digest(a), weights_digest(a) == weights_digest(b)
    (True, False)
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class MutationRecord(FileModel):
    """One growth step as logged (a line of the JSONL log): what was done where, its cost, how far the output moved.

    >>> import growth
    >>> r = growth.MutationRecord(op="net2wider", site="layer2.0.conv1", args={"factor": 1.5, "seed": 0})
    >>> r.to_json()["args"], r.step
    ({'factor': 1.5, 'seed': 0}, 0)
    """

    op: str
    site: str
    args: dict[str, Any] = Field(default_factory=dict)
    params_before: NonNegativeInt = 0
    params_after: NonNegativeInt = 0
    flops_before: NonNegativeInt = 0
    flops_after: NonNegativeInt = 0
    max_abs_change: Float = 0.0
    step: NonNegativeInt = 0
    input_shape: Annotated[list[PositiveInt], AfterValidator(check_example_size)] | None = None  # one float input
    inputs: list[InputSpec] | None = None  # or: the inputs by name, shape and dtype
    base_seed: int | None = None  # the seed the starting model was built with (the command line's --seed)
    weights_before: Digest | None = None  # weights_digest of the model the step was applied to
    weights_after: Digest | None = None  # ... and of the model it made

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def probabilities(ops: Iterable[str] | None = None, probs: dict[str, float] | None = None) -> dict[str, float]:
    """The weight of every op to draw from: the registered defaults, restricted to ``ops``, overridden by ``probs``."""
    names = list(ops) if ops is not None else list(OPS)
    for name in [*names, *(probs or {})]:
        get_op(name)
    weights = {name: (probs or {}).get(name, OPS[name].probability) for name in names}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise GrowthError(f"op probabilities must be >= 0 with at least one > 0; got {weights}")
    return {name: w for name, w in weights.items() if w > 0}


def _measured(
    record: MutationRecord,
    before: nn.Module,
    after: nn.Module,
    inputs: Example | Sequence[torch.Tensor],
    digest_before: str | None = None,
) -> MutationRecord:
    old, new = cost(before, inputs), cost(after, inputs)
    change = output_change(before, after, inputs)
    return record.model_copy(
        update={
            "params_before": old.params,
            "params_after": new.params,
            "flops_before": old.flops,
            "flops_after": new.flops,
            "max_abs_change": change.max_abs,
            "weights_before": digest_before or weights_digest(before),
            "weights_after": weights_digest(after),
        }
    )


def apply_step(
    model: nn.Module, record: MutationRecord, example_input: Any = None, digest_before: str | None = None
) -> tuple[nn.Module, MutationRecord]:
    """Apply the op ``record`` names at its site with its arguments; return the grown model and the measured record.

    ``digest_before``: :func:`weights_digest` of ``model`` if the caller has it (it is recorded, else computed).
    """
    grown = get_op(record.op).apply(model, record.site, record.args, example_input)
    return grown, _measured(record, model, grown, default_inputs(model, example_input), digest_before)


def random_mutation(
    model: nn.Module,
    rng: random.Random,
    ops: Iterable[str] | None = None,
    probs: dict[str, float] | None = None,
    example_input: Any = None,
    digest_before: str | None = None,
) -> tuple[nn.Module, MutationRecord]:
    """One random feasible growth step: ``(grown model, record)``.

    The op is drawn with weights :func:`probabilities`; an op with no feasible site is
    dropped and another drawn. ``rng`` drives every choice (site, factor, seeds).
    ``digest_before``: see :func:`apply_step`.

    >>> import random, surgery, growth
    >>> net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32)
    >>> grown, record = growth.random_mutation(net, random.Random(0), ops=["net2wider"])
    >>> record.op, record.params_after > record.params_before, record.max_abs_change < 1e-4
    ('net2wider', True, True)
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
        record = MutationRecord(op=name, site=site, args=args, **input_record(Example.of(example_input)))
        return apply_step(model, record, example_input, digest_before)
    raise GrowthError(
        f"no growth op among {', '.join(probabilities(ops, probs))} applies anywhere in {type(model).__name__}"
    )


def mutate(
    model: nn.Module,
    steps: int,
    seed: int,
    log: str | os.PathLike[str] | None = None,
    example_input: Any = None,
    ops: Iterable[str] | None = None,
    probs: dict[str, float] | None = None,
    base_seed: int | None = None,
) -> tuple[nn.Module, list[MutationRecord]]:
    """``steps`` random growth steps drawn from ``seed``; each is appended to the JSONL ``log`` as it is done.

    The log starts empty. Returns the grown model and the records; :func:`replay` of the
    log on the same starting model gives bit-identical weights. Each record holds the
    :func:`weights_digest` of the model before and after its step (so a replay on other
    weights is refused) and ``base_seed``, the seed the caller built ``model`` with, if given.

    >>> import surgery, growth
    >>> net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32)
    >>> grown, records = growth.mutate(net, steps=2, seed=0)
    >>> len(records), all(r.max_abs_change < 1e-4 for r in records), records[0].params_after > records[0].params_before
    (2, True, True)
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
    digest: str | None = weights_digest(model)
    for step in range(steps):
        model, record = random_mutation(model, rng, op_names, probs, example_input, digest)
        record.step, record.base_seed, digest = step, base_seed, record.weights_after
        records.append(record)
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps(record.to_json()) + "\n")
    return model, records


def _record(data: Any, where: str) -> MutationRecord:
    try:
        record = parse(MutationRecord, data, where, fix="the log is corrupt")
    except SurgeryError as e:
        raise GrowthError(str(e)) from None
    if record.op not in OPS:
        raise GrowthError(f"{where}: unknown op '{record.op}'; known: {', '.join(sorted(OPS))}")
    return record


def read_log(log: str | os.PathLike[str]) -> list[MutationRecord]:
    """Parse a growth log; a missing, unreadable or corrupt one raises a one-line error naming the line.

    >>> import tempfile, surgery, growth
    >>> log = tempfile.mkdtemp() + "/mutations.jsonl"
    >>> net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32)
    >>> _ = growth.mutate(net, steps=1, seed=0, ops=["net2wider"], log=log)
    >>> [(r.op, r.step) for r in growth.read_log(log)]
    [('net2wider', 0)]
    """
    path = Path(log)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GrowthError(
            f"cannot read growth log '{path}': {e.strerror if isinstance(e, OSError) else first_line(e)}"
        ) from None
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


def _recorded_example(record: MutationRecord) -> Example | None:
    """The input a step was measured on: seeded random images of its shape, or tensors of its specs."""
    if record.inputs:
        return Example.from_specs(record.inputs)
    return (
        Example((torch.randn(record.input_shape, generator=torch.Generator().manual_seed(0)),), {})
        if record.input_shape
        else None
    )


def replay(
    model: nn.Module, log: str | os.PathLike[str] | Sequence[MutationRecord]
) -> tuple[nn.Module, list[MutationRecord]]:
    """Re-apply every step of a growth log to ``model``; returns the grown model and freshly measured records.

    ``model`` must have the weights the log was grown from (its first step's ``weights_before``
    digest, when logged): other weights are refused. A step that rebuilds other weights than
    the logged ones (another torch version or machine) is warned about.

    >>> import tempfile, surgery, growth
    >>> net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32)
    >>> log = tempfile.mkdtemp() + "/mutations.jsonl"
    >>> grown, _ = growth.mutate(net, steps=2, seed=0, log=log)
    >>> again, _ = growth.replay(net, log)  # the same steps, seeds included: the same network
    >>> growth.weights_digest(again) == growth.weights_digest(grown)
    True
    """
    records = read_log(log) if isinstance(log, (str, os.PathLike)) else list(log)
    done: list[MutationRecord] = []
    digest = weights_digest(model) if records else None
    if records:
        _check_base(records[0], str(digest))
    for record in records:
        example = _recorded_example(record)
        try:
            model, measured = apply_step(model, record, example, digest)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - logged arguments from a file may break an op anywhere
            raise GrowthError(
                f"step {record.step} ({record.op} at '{record.site}') fails on its logged arguments ({first_line(e)}); "
                "the log is corrupt or from another version"
            ) from None
        done.append(measured)
        digest = measured.weights_after
        if record.weights_after not in (None, digest):
            warnings.warn(
                f"step {record.step} ({record.op} at '{record.site}') rebuilt other weights than the logged run "
                f"(SHA-256 {str(digest)[:12]}, logged {record.weights_after[:12]}): another torch version or machine "
                "computes them to other last bits",
                stacklevel=2,
            )
    return model, done


def _check_base(first: MutationRecord, digest: str) -> None:
    """Refuse, in one line, a replay on other weights than those the log was grown from."""
    if first.weights_before is None or first.weights_before == digest:
        return
    built = (
        f"build it with torch.manual_seed({first.base_seed}) first, as `growth replay` does"
        if first.base_seed is not None
        else "replay on the very model the log was grown from"
    )
    raise GrowthError(
        f"the model's weights are not those the log was grown from (SHA-256 {digest[:12]}, logged "
        f"{first.weights_before[:12]}); {built}"
    )
