"""Evaluate every stitched path of a cohort, ensembles, the Pareto front, and budgets.

>>> from xross.run.evaluate import PathResult, best_path
>>> results = [PathResult(path=(0, 0), name="a > a", top1=70.0, top5=90.0, params=21_000_000, flops=3e9),
...            PathResult(path=(1, 1), name="b > b", top1=68.0, top5=89.0, params=11_000_000, flops=1e9)]
>>> best_path(results, max_params=12e6).path
(1, 1)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, Strict
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.core.schema import FileModel, Float, parse
from surgery.core.util import atomic_write_text, evaluating, first_line
from surgery.graph.flops import count_flops, count_params, human
from xross.cohort.exits import exit_prefixes, feature
from xross.cohort.grid import Cohort, Route, call_part
from xross.cohort.lm import per_token
from xross.cohort.logits import as_logits
from xross.errors import XrossError
from xross.run.teachers import Teachers, ensemble_probs

PathRole = Literal["path", "student", "teacher", "setting"]


class PathResult(FileModel):
    """Accuracy and cost of one network: top-1/top-5 in %, parameters, forward FLOPs per image.

    ``role`` is ``path`` for a cohort's path (``path`` its net index per part), ``student``
    or ``teacher`` in a distillation run (``path`` then empty, or a teacher's cohort path),
    ``setting`` for one width and input resolution of a mutualnet run (``width``, ``resolution``).
    """

    path: Annotated[tuple[Annotated[NonNegativeInt, Strict()], ...], Strict(False)]  # a JSON list, held as a tuple
    name: str
    role: PathRole = "path"
    top1: Float = Field(ge=0, le=100)
    top5: Float = Field(ge=0, le=100)
    params: NonNegativeInt
    flops: NonNegativeFloat
    width: Float | None = Field(None, gt=0, le=1)
    resolution: PositiveInt | None = None
    loss: NonNegativeFloat | None = None  # causal LMs: mean next-token cross-entropy (nats); top-1/5 of the token
    perplexity: NonNegativeFloat | None = None  # exp(loss)


class Accuracy(FileModel):
    top1: Float = Field(ge=0, le=100)
    top5: Float = Field(ge=0, le=100)
    loss: NonNegativeFloat | None = None  # causal LMs, as PathResult's
    perplexity: NonNegativeFloat | None = None


class ExitResult(FileModel):
    """Accuracy and cost of one exit: the head after ``prefix`` (net indices of the parts run so far).

    ``flops`` and ``params`` count the parts and adapters of the prefix and the head itself.
    """

    prefix: Annotated[tuple[Annotated[NonNegativeInt, Strict()], ...], Strict(False)]
    name: str
    top1: Float = Field(ge=0, le=100)
    top5: Float = Field(ge=0, le=100)
    params: NonNegativeInt
    flops: NonNegativeFloat


class EvalResult(FileModel):
    """``eval.json``: every evaluated path, the ensembles (mean softmax), the number of images, the split
    they came from and, in a run with exit heads, every exit along the evaluated paths."""

    format_version: Literal[1] = 1
    paths: list[PathResult]
    ensembles: dict[str, Accuracy]
    samples: PositiveInt
    exits: list[ExitResult] = Field(default_factory=list)
    split: str | None = None  # the split folder evaluated (test/, else val/); absent in files before it was recorded

    def counted_on(self) -> str:
        """The images scored, for a table's title: ``'64 images of the val split'``.

        >>> EvalResult(paths=[], ensembles={}, samples=64, split="val").counted_on()
        '64 images of the val split'
        """
        return f"{self.samples} images" + (f" of the {self.split} split" if self.split else "")

    def own(self, net: int, num_parts: int) -> PathResult:
        return next(r for r in self.paths if r.path == (net,) * num_parts)

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> EvalResult:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise XrossError(f"cannot read evaluation {path}: {first_line(e)}; run `xross eval` again") from None
        try:
            return parse(cls, data, str(path), fix="run `xross eval` again")
        except SurgeryError as e:
            raise XrossError(str(e)) from None


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many of ``labels`` are the top-1 and among the top-5 of ``logits``: an int64 pair on the CPU."""
    k = min(5, logits.shape[1])
    hit = logits.topk(k, dim=1).indices == labels[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).cpu()


def percentages(
    hits: torch.Tensor, n: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None
) -> tuple[list[list[float]], int]:
    """Hit counts (summed over ranks by ``reduce``) as percentages of the ``n`` images scored, and ``n``."""
    if reduce is not None:
        total = reduce(torch.cat([hits.flatten(), torch.tensor([n])]))
        hits, n = total[:-1].view_as(hits), int(total[-1])
    if n == 0:
        raise XrossError("the evaluation set is empty")
    return [[100 * c / n for c in row] for row in hits.tolist()], n


def path_costs(
    cohort: Cohort, paths: Iterable[Route], image_size: int, device: torch.device | str = "cpu", exits: bool = False
) -> dict[Route, tuple[int, float]]:
    """(parameters, forward FLOPs per image) of each path (or prefix); FLOPs of each part counted once.

    With ``exits=True`` each ``path`` is an exit's prefix and the cost includes its exit head.
    """
    x = cohort.example_input(image_size).to(device)
    flops: dict[int, float] = {}
    out: dict[Route, tuple[int, float]] = {}
    with torch.no_grad():
        for path in paths:
            h = x
            total = 0.0
            modules = cohort.modules_of(path)
            if exits:
                modules.append(cohort.exits.head(path[-1], len(path) - 1))  # type: ignore[union-attr]
            for m in modules:
                if exits and m is modules[-1]:
                    h = feature(h)
                args = h if isinstance(h, tuple) else (h,)
                if id(m) not in flops:
                    flops[id(m)] = count_flops(m, *args)
                total += flops[id(m)]
                with evaluating(m):
                    h = call_part(m, h)
            out[path] = (count_params(modules), total)
    return out


@torch.no_grad()
def evaluate(
    cohort: Cohort,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    image_size: int,
    paths: Sequence[Route] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lockstep: bool = False,
) -> EvalResult:
    """Top-1/top-5 (%) of every path (default all K**P) plus ensembles, in eval mode.

    Ensembles average softmax outputs: ``nets`` over the K full networks,
    ``all_paths`` over every evaluated path. In a distributed run each rank passes its
    shard of ``batches`` and a ``reduce`` that sums a tensor of counts over the ranks,
    so every rank returns the result on the whole evaluation set; with ``lockstep`` (a sharded
    cohort, whose pieces gather their weights in their forward) a rank with an empty shard of a batch runs
    the forward of one dummy row.
    """
    paths = list(paths) if paths is not None else cohort.paths()
    own = [cohort.own_path(i) for i in range(cohort.num_nets)]
    ensembles = {"nets": own, "all_paths": paths}
    prefixes = exit_prefixes(paths, cohort.num_parts) if cohort.exits is not None else []
    # correct predictions: a row per path, per ensemble, then per exit; columns top-1, top-5
    hits = torch.zeros(len(paths) + len(ensembles) + len(prefixes), 2, dtype=torch.int64)
    n = 0
    device = next(cohort.parameters()).device
    computed = list(dict.fromkeys([*paths, *own]))
    with evaluating(cohort):
        for images, labels in batches:
            if len(labels) == 0:  # a rank's part of a short last batch
                if lockstep:  # one row of zeros: some models refuse an empty batch
                    cohort.forward_paths(images.new_zeros((1, *images.shape[1:])), computed)
                continue
            values: dict[Route, object] = {}
            logits = cohort.forward_paths(images, computed, prefixes=values)
            for row, p in enumerate(paths):
                hits[row] += topk_correct(logits[p].float(), labels)
            for row, members in enumerate(ensembles.values(), start=len(paths)):
                probs = torch.stack([logits[p].float().softmax(1) for p in members]).mean(0)
                hits[row] += topk_correct(probs, labels)
            for row, prefix in enumerate(prefixes, start=len(paths) + len(ensembles)):
                hits[row] += topk_correct(cohort.exits.logits(prefix, values[prefix]).float(), labels)  # type: ignore[union-attr]
            n += len(labels)
    pct, n = percentages(hits, n, reduce)
    exit_rows = pct[len(paths) + len(ensembles) :]
    exit_costs = path_costs(cohort, prefixes, image_size, device, exits=True)
    exits = [
        ExitResult(prefix=q, name=cohort.path_name(q), top1=acc[0], top5=acc[1], params=cost[0], flops=cost[1])
        for q, acc, cost in zip(prefixes, exit_rows, (exit_costs[q] for q in prefixes))
    ]
    costs = path_costs(cohort, paths, image_size, device)
    results = [
        PathResult(
            path=p, name=cohort.path_name(p), top1=pct[row][0], top5=pct[row][1], params=costs[p][0], flops=costs[p][1]
        )
        for row, p in enumerate(paths)
    ]
    accuracy = {k: Accuracy(top1=pct[len(paths) + i][0], top5=pct[len(paths) + i][1]) for i, k in enumerate(ensembles)}
    return EvalResult(paths=results, ensembles=accuracy, samples=n, exits=exits)


@torch.no_grad()
def evaluate_lm(
    cohort: Cohort,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    paths: Sequence[Route] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lockstep: bool = False,
) -> EvalResult:
    """Causal LMs: per path (default all), the mean next-token cross-entropy over the scored tokens
    (``loss``), ``perplexity = exp(loss)`` and next-token top-1/top-5 (%); ensembles (mean softmax) alike.
    ``samples`` counts the tokens scored; ``reduce`` and ``lockstep`` as :func:`evaluate`'s."""
    paths = list(paths) if paths is not None else cohort.paths()
    own = [cohort.own_path(i) for i in range(cohort.num_nets)]
    groups = {"nets": own, "all_paths": paths}
    rows = len(paths) + len(groups)
    sums = torch.zeros(rows, 3, dtype=torch.float64)  # cross-entropy summed over tokens, top-1 and top-5 hits
    n = 0
    computed = list(dict.fromkeys([*paths, *own]))
    with evaluating(cohort):
        for ids, targets in batches:
            if len(targets) == 0:
                if lockstep:  # one window of zeros: a decoder refuses an empty batch
                    cohort.forward_paths(ids.new_zeros((1, *ids.shape[1:])), computed)
                continue
            logits, y = per_token(cohort.forward_paths(ids, computed), targets)
            log_probs = [torch.log_softmax(logits[p].double(), 1) for p in paths]
            log_probs += [
                torch.stack([logits[p].double().softmax(1) for p in m]).mean(0).log() for m in groups.values()
            ]
            for row, lp in enumerate(log_probs):
                sums[row, 0] += float(-lp.gather(1, y[:, None]).sum())
                sums[row, 1:] += topk_correct(lp, y).double()
            n += len(y)
    if reduce is not None:
        total = reduce(torch.cat([sums.flatten(), torch.tensor([float(n)], dtype=torch.float64)]))
        sums, n = total[:-1].view_as(sums), int(total[-1])
    if n == 0:
        raise XrossError("the evaluation windows hold no token to predict")
    scores = [{"loss": ce / n, "perplexity": math.exp(ce / n), "top1": 100 * t1 / n, "top5": 100 * t5 / n}
              for ce, t1, t5 in sums.tolist()]  # fmt: skip
    costs = path_costs(cohort, paths, 0, next(cohort.parameters()).device)
    results = [
        PathResult(path=p, name=cohort.path_name(p), params=costs[p][0], flops=costs[p][1], **scores[row])
        for row, p in enumerate(paths)
    ]
    ensembles = {k: Accuracy(**scores[len(paths) + i]) for i, k in enumerate(groups)}
    return EvalResult(paths=results, ensembles=ensembles, samples=n)


def _cost(module: nn.Module, path: Route | None, image_size: int) -> tuple[int, float]:
    """(parameters, FLOPs per image) of a network, or of one path when ``module`` is a cohort."""
    if path is not None:
        return path_costs(module, [path], image_size, next(module.parameters()).device)[path]  # type: ignore[arg-type]
    p = next(module.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    return count_params(module), float(count_flops(module, x))


@torch.no_grad()
def evaluate_distillation(
    student: nn.Module,
    teachers: Teachers | None,
    weights: torch.Tensor | None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    image_size: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    student_name: str = "student",
) -> EvalResult:
    """Top-1/top-5 (%) of a student, of each teacher and of the teachers' ensemble (weighted mean softmax).

    ``teachers=None`` scores the student alone (the per-epoch check). The ensemble is
    ``ensembles["teachers"]``; :func:`distillation_gap` is the student's distance to it.
    """
    members = teachers.members() if teachers is not None else []
    hits = torch.zeros(1 + len(members) + (1 if members else 0), 2, dtype=torch.int64)
    n = 0
    with evaluating(student):
        for images, labels in batches:
            if len(labels) == 0:
                continue
            hits[0] += topk_correct(as_logits(student(images), "the student").float(), labels)
            if teachers is not None:
                outputs = teachers(images)
                for row, logits in enumerate(outputs, start=1):
                    hits[row] += topk_correct(logits.float(), labels)
                hits[-1] += topk_correct(ensemble_probs(outputs, 1.0, weights), labels)  # type: ignore[arg-type]
            n += len(labels)
    pct, n = percentages(hits, n, reduce)
    rows: list[tuple[str, nn.Module, Route | None, PathRole]] = [
        (student_name, student, None, "student"),
        *((name, m, p, "teacher") for name, m, p in members),
    ]
    results = []
    for (name, module, path, role), (top1, top5) in zip(rows, pct):
        params, flops = _cost(module, path, image_size)
        results.append(
            PathResult(path=path or (), name=name, role=role, top1=top1, top5=top5, params=params, flops=flops)
        )
    ensembles = {"teachers": Accuracy(top1=pct[-1][0], top5=pct[-1][1])} if members else {}
    return EvalResult(paths=results, ensembles=ensembles, samples=n)


def distillation_gap(result: EvalResult) -> float | None:
    """Student top-1 minus the teachers' ensemble top-1 (percentage points), if both were evaluated."""
    student = next((r for r in result.paths if r.role == "student"), None)
    if student is None or "teachers" not in result.ensembles:
        return None
    return student.top1 - result.ensembles["teachers"].top1


def pareto_front(results: Sequence[PathResult], cost: str = "params") -> list[PathResult]:
    """Paths no other path beats on both top-1 and ``cost`` (``params`` or ``flops``), cheapest first."""
    ordered = sorted(results, key=lambda r: (getattr(r, cost), -r.top1))
    front, best = [], float("-inf")
    for r in ordered:
        if r.top1 > best:
            front.append(r)
            best = r.top1
    return front


def best_path(
    results: Sequence[PathResult],
    max_params: float | None = None,
    max_flops: float | None = None,
    max_latency: float | None = None,
    latency: Mapping[str, float] | None = None,
) -> PathResult:
    """The most accurate path, student or setting (never a teacher) within the budget (ties: fewer parameters).

    ``max_latency`` (ms) needs ``latency``: milliseconds per network name (a run's latency table).
    """
    results = [r for r in results if r.role != "teacher"]
    if max_latency is not None:
        if latency is None:
            raise XrossError("a latency budget needs the run's latency table; measure it with `xross profile RUN`")
        missing = [r.name for r in results if r.name not in latency]
        if missing:
            raise XrossError(f"the latency table lacks '{missing[0]}'; measure it again with `xross profile RUN`")

    def fits(r: PathResult) -> bool:
        return (
            (max_params is None or r.params <= max_params)
            and (max_flops is None or r.flops <= max_flops)
            and (max_latency is None or latency is None or latency[r.name] <= max_latency)
        )

    chosen = [r for r in results if fits(r)]
    if not chosen:
        smallest = min(results, key=lambda r: (r.flops, r.params))
        ms = f", {latency[smallest.name]:.2f} ms" if latency and smallest.name in latency else ""
        raise XrossError(
            f"nothing fits the budget (max params {human(max_params) if max_params else '-'}, max FLOPs "
            f"{human(max_flops) if max_flops else '-'}, max latency {f'{max_latency:g} ms' if max_latency else '-'}); "
            f"the cheapest, '{smallest.name}', has {human(smallest.params)} params, {human(smallest.flops)} FLOPs{ms}"
        )
    return max(chosen, key=lambda r: (r.top1, -r.params))
