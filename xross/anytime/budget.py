"""Budgeted batch classification (MSDNet's second setting): stop each image at the first confident exit.

Along a route with exits at stages ``0..P-2`` and the final output at ``P-1``, an image stops at the
first stage ``k < P-1`` whose top softmax probability reaches ``thresholds[k]``, else at the end. Its
cost is what was run to get there: the parts, adapters and every exit head evaluated on the way.

Thresholds are calibrated on held-out training images (the run's ``holdout``) so that the *mean*
cost meets a budget, as MSDNet does: a share of the images leaves at each exit, the shares
geometric in the stage (``ratio ** k``, normalised), the threshold of each exit the confidence of
the last image it lets go; the ratio is found by bisection. The test split then shows whether the
budget holds on images the calibration never saw.

>>> import torch
>>> conf = torch.tensor([[0.9, 0.2, 0.8, 0.1], [0.5, 0.9, 0.5, 0.3], [1.0, 1.0, 1.0, 1.0]])
>>> right = torch.ones(3, 4, dtype=torch.bool)
>>> records = StageRecords(conf, right)
>>> t = calibrate(records, [1.0, 2.0, 4.0], budget=2.0)
>>> stages = records.stages(t)
>>> stages.tolist(), records.mean_cost(t, [1.0, 2.0, 4.0]) <= 2.0
([0, 1, 0, 2], True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch

from surgery.core.util import evaluating
from xross.cohort.exits import exit_prefixes
from xross.cohort.grid import Cohort, Route

LOG_RATIO_RANGE = 12.0
NEVER = 2.0  # a threshold no softmax probability reaches: nobody leaves at that exit


@dataclasses.dataclass
class StageRecords:
    """Per stage of a route (rows) and image (columns): top softmax probability, and whether top-1 is right."""

    confidence: torch.Tensor
    correct: torch.Tensor

    @property
    def num_stages(self) -> int:
        return self.confidence.shape[0]

    def stages(self, thresholds: Sequence[float]) -> torch.Tensor:
        """The stage each image stops at."""
        stop = torch.full((self.confidence.shape[1],), self.num_stages - 1, dtype=torch.long)
        done = torch.zeros_like(stop, dtype=torch.bool)
        for k, t in enumerate(thresholds):
            leave = ~done & (self.confidence[k] >= t)
            stop[leave] = k
            done |= leave
        return stop

    def accuracy(self, thresholds: Sequence[float]) -> float:
        stop = self.stages(thresholds)
        return 100.0 * float(self.correct.gather(0, stop[None]).float().mean())

    def mean_cost(self, thresholds: Sequence[float], stage_costs: Sequence[float]) -> float:
        return float(torch.tensor(stage_costs, dtype=torch.float64)[self.stages(thresholds)].mean())


def thresholds_for(records: StageRecords, log_ratio: float) -> list[float]:
    """Thresholds that let ``ratio ** k`` (normalised) of the images go at stage ``k``, most confident first."""
    stages, n = records.num_stages, records.confidence.shape[1]
    weights = [math.exp(log_ratio * k - LOG_RATIO_RANGE * (stages - 1)) for k in range(stages)]
    cumulative = [round(n * sum(weights[: k + 1]) / sum(weights)) for k in range(stages)]
    counts = [cumulative[0], *(cumulative[k] - cumulative[k - 1] for k in range(1, stages))]
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for k in range(stages - 1):
        conf = records.confidence[k][remaining]
        if counts[k] <= 0 or conf.numel() == 0:
            thresholds.append(NEVER)
            continue
        t = float(conf.sort(descending=True).values[min(counts[k], conf.numel()) - 1])
        thresholds.append(t)
        remaining &= records.confidence[k] < t
    return thresholds


def calibrate(
    records: StageRecords, stage_costs: Sequence[float], budget: float, iterations: int = 40
) -> list[float] | None:
    """The thresholds that spend the most of ``budget`` (mean cost per image) on ``records``; None if even
    stopping every image at the first exit costs more."""
    lo, hi = -LOG_RATIO_RANGE, LOG_RATIO_RANGE
    if records.mean_cost(thresholds_for(records, hi), stage_costs) <= budget:
        return thresholds_for(records, hi)
    if records.mean_cost(thresholds_for(records, lo), stage_costs) > budget:
        return None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if records.mean_cost(thresholds_for(records, mid), stage_costs) <= budget:
            lo = mid
        else:
            hi = mid
    return thresholds_for(records, lo)


def stage_costs(step: Sequence[float], exit_cost: Sequence[float]) -> list[float]:
    """Cost of stopping at each stage of a route: every step run and every exit head evaluated so far."""
    return [sum(step[: k + 1]) + sum(exit_cost[: k + 1]) for k in range(len(step))]


@torch.no_grad()
def collect(cohort: Cohort, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[Route, StageRecords]:
    """Every route's :class:`StageRecords` on ``batches`` (each prefix computed once per batch)."""
    paths = cohort.paths()
    prefixes = exit_prefixes(paths, cohort.num_parts)
    confidence: dict[Route, list[torch.Tensor]] = {p: [] for p in [*prefixes, *paths]}
    correct: dict[Route, list[torch.Tensor]] = {p: [] for p in confidence}
    with evaluating(cohort):
        for images, labels in batches:
            values: dict[Route, object] = {}
            logits = cohort.forward_paths(images, paths, prefixes=values)
            outputs = {**{q: cohort.exits.logits(q, values[q]) for q in prefixes}, **logits}  # type: ignore[union-attr]
            for q, out in outputs.items():
                top = out.float().softmax(1).max(1)
                confidence[q].append(top.values.cpu())
                correct[q].append((top.indices.cpu() == labels.cpu()))
    by_prefix = {q: (torch.cat(confidence[q]), torch.cat(correct[q])) for q in confidence}
    return {
        p: StageRecords(
            torch.stack([by_prefix[p[: k + 1]][0] for k in range(len(p))]),
            torch.stack([by_prefix[p[: k + 1]][1] for k in range(len(p))]),
        )
        for p in paths
    }
