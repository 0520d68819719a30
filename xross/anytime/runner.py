"""Any-time inference over the cohort grid: run a route part by part and answer when time (or FLOPs) runs out.

A *route* is a path through the grid (one net per part, adapters between). After part ``k`` the
route can answer from the exit head there (:mod:`xross.cohort.exits`); after its last part, from the net's
own classifier. Before each part :class:`AnytimeRunner` asks the run's latency table whether that
part (with the adapter before it) and the exit after it fit in what is left of the deadline and of
the FLOP budget; if not, it answers from the exit it has reached. The check uses the real clock, so
a slow machine stops earlier, never later, than the table says.

:func:`plan` makes the same decisions from the table alone for every route and picks the route
whose reachable exit is the most accurate (accuracy from a held-out split, or ``eval.json``).

>>> costs = RouteCosts(path=(0, 1), step_ms=[2.0, 3.0], exit_ms=[0.5, 0.0], step_flops=[10, 20], exit_flops=[1, 0])
>>> costs.reachable(deadline_ms=4.0), costs.reachable(deadline_ms=5.0), costs.reachable(flops=31)
(0, 1, 1)
>>> costs.reachable(deadline_ms=2.0) is None
True
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from xross.anytime.latency import LatencyTable, adapter_entry, exit_entry, latency_table, part_entry
from xross.cohort.grid import Cohort, Route
from xross.errors import XrossError
from xross.run.directory import load_run
from xross.run.evaluate import EvalResult


@dataclasses.dataclass(frozen=True)
class RouteCosts:
    """Per stage ``k`` of a route: what running it costs (the adapter into part ``k``, then the part) and what
    answering from its exit costs (0 after the last part, whose classifier is part of it); ms and FLOPs."""

    path: Route
    step_ms: list[float]
    exit_ms: list[float]
    step_flops: list[float]
    exit_flops: list[float]

    @classmethod
    def of(cls, path: Route, table: LatencyTable) -> RouteCosts:
        """The costs of ``path`` from the latency table (``xross profile`` measures every piece)."""
        last = len(path) - 1
        step: list[list[str]] = []
        for k, net in enumerate(path):
            names = [part_entry(net, k)]
            if k > 0 and path[k - 1] != net and adapter_entry(k - 1, path[k - 1], net) in table.entries:
                names.insert(0, adapter_entry(k - 1, path[k - 1], net))
            step.append(names)
        exits = [[exit_entry(net, k)] if k < last else [] for k, net in enumerate(path)]
        missing = [n for names in step + exits for n in names if n not in table.entries]
        if missing:
            raise XrossError(
                f"the latency table lacks '{missing[0]}'; measure the pieces with `xross profile RUN` "
                "(a run trained with --exits)"
            )

        def total(names: list[str], field: str) -> float:
            return float(sum(getattr(table.entries[n], field) for n in names))

        return cls(
            path=path,
            step_ms=[total(n, "ms_batch1") for n in step],
            exit_ms=[total(n, "ms_batch1") for n in exits],
            step_flops=[total(n, "flops") for n in step],
            exit_flops=[total(n, "flops") for n in exits],
        )

    @property
    def first_exit_ms(self) -> float:
        return self.step_ms[0] + self.exit_ms[0]

    def reachable(self, deadline_ms: float | None = None, flops: float | None = None) -> int | None:
        """The last stage whose exit the table says is reached within the limits (None: not even the first)."""
        limit_ms = math.inf if deadline_ms is None else deadline_ms
        limit_flops = math.inf if flops is None else flops
        ms = fl = 0.0
        reached = None
        for k in range(len(self.path)):
            over_time = ms + self.step_ms[k] + self.exit_ms[k] > limit_ms
            if over_time or fl + self.step_flops[k] + self.exit_flops[k] > limit_flops:
                break
            ms, fl, reached = ms + self.step_ms[k], fl + self.step_flops[k], k
        return reached

    def cost_to(self, stage: int) -> tuple[float, float]:
        """(ms, FLOPs) of running to ``stage`` and answering from its exit."""
        return (
            sum(self.step_ms[: stage + 1]) + self.exit_ms[stage],
            sum(self.step_flops[: stage + 1]) + self.exit_flops[stage],
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """A route chosen for a deadline/budget, the exit the table says it reaches, and that exit's accuracy."""

    path: Route
    stage: int
    accuracy: float
    ms: float
    flops: float

    @property
    def prefix(self) -> Route:
        return self.path[: self.stage + 1]


def plan(
    routes: Sequence[RouteCosts],
    accuracy: Mapping[Route, float],
    deadline_ms: float | None = None,
    flops: float | None = None,
) -> Plan | None:
    """The route whose reachable exit is the most accurate (ties: the cheaper), or None if no route reaches one.

    ``accuracy`` holds top-1 by prefix: an exit's prefix, or a whole path for its final output.
    """
    best: Plan | None = None
    for r in routes:
        stage = r.reachable(deadline_ms, flops)
        if stage is None:
            continue
        ms, fl = r.cost_to(stage)
        candidate = Plan(r.path, stage, accuracy[r.path[: stage + 1]], ms, fl)
        if best is None or (candidate.accuracy, -candidate.ms) > (best.accuracy, -best.ms):
            best = candidate
    return best


def minimum_deadline(routes: Sequence[RouteCosts]) -> float:
    """The smallest deadline any route can answer within: the cheapest first part plus its exit (ms)."""
    return min(r.first_exit_ms for r in routes)


def check_deadline(routes: Sequence[RouteCosts], deadline_ms: float | None, device: str = "this machine") -> None:
    """Refuse, in one line naming the minimum, a deadline no route can answer within."""
    cheapest = minimum_deadline(routes)
    if deadline_ms is not None and deadline_ms < cheapest:
        raise XrossError(
            f"a deadline of {deadline_ms:g} ms is below the cheapest first exit ({cheapest:.3g} ms on {device}); "
            f"give at least {cheapest:.3g} ms"
        )


def accuracy_by_prefix(result: EvalResult) -> dict[Route, float]:
    """Top-1 by prefix from an evaluation: every exit's, and every path's final output."""
    return {**{e.prefix: e.top1 for e in result.exits}, **{r.path: r.top1 for r in result.paths}}


@dataclasses.dataclass
class Answer:
    """What an any-time call returns: logits, the exit answered from (its prefix), time spent, FLOPs run."""

    logits: torch.Tensor
    prefix: Route
    elapsed_ms: float
    flops: float
    final: bool
    trace: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    """One ``(stage, ms left before it, ms it was expected to take with its exit)`` per stage run: the table's
    latency, scaled up by how much slower than the table the call has run so far."""


class AnytimeRunner:
    """Runs one route of a cohort with exit heads under a deadline (ms) and/or a FLOP budget.

    Before part ``k`` the runner reads the clock: the part runs only if its table latency (with the
    adapter before it and the exit after it, scaled up when this call has so far run slower than the
    table says) fits in what is left, and its FLOPs in what is left of ``flops``; otherwise the answer
    comes from the exit reached. ``clock`` returns seconds
    (``time.perf_counter`` by default; tests inject a simulated one). ``path=None`` picks the route
    :func:`plan` finds for the limits, with ``accuracy`` by prefix.

    >>> import torch, surgery, xross
    >>> from xross.anytime.latency import LatencyEntry, LatencyTable, exit_entry, part_entry
    >>> from xross.cohort.grid import Cohort
    >>> vgg = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=32)
    >>> cohort = Cohort.build([vgg], cuts=["features.0"], num_classes=10, image_size=32, exits=True).eval()
    >>> def timed(ms):  # a hand-written table entry (`xross profile RUN` measures them)
    ...     return LatencyEntry(ms_batch1=ms, ms_batch=ms, batch=1, flops=1e6 * ms, params=1)
    >>> costs = {part_entry(0, 0): timed(2.0), exit_entry(0, 0): timed(0.5), part_entry(0, 1): timed(3.0)}
    >>> table = LatencyTable(device="cpu", entries=costs)
    >>> runner = xross.AnytimeRunner(cohort, table, flops=3e6, path=(0, 0))  # part 1 does not fit in 3 MFLOPs
    >>> answer = runner(torch.randn(2, 3, 32, 32))
    >>> answer.prefix, answer.final, answer.logits.shape
    ((0,), False, torch.Size([2, 10]))
    """

    def __init__(
        self,
        cohort: Cohort,
        table: LatencyTable,
        deadline_ms: float | None = None,
        flops: float | None = None,
        *,
        path: Route | None = None,
        accuracy: Mapping[Route, float] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if cohort.exits is None:
            raise XrossError("this cohort has no exit heads; retrain with --exits or run `xross add-exits RUN`")
        routes = [RouteCosts.of(p, table) for p in cohort.paths()]
        check_deadline(routes, deadline_ms, table.device)
        if path is None:
            if accuracy is None:
                raise XrossError("give a path, or the accuracy of every exit to choose one by")
            chosen = plan(routes, accuracy, deadline_ms, flops)
            if chosen is None:
                raise XrossError(f"no route reaches an exit within {flops:g} FLOPs; give a larger budget")
            path = chosen.path
        costs = next((r for r in routes if r.path == tuple(path)), None)
        if costs is None:
            raise XrossError(f"path {list(path)} needs {cohort.num_parts} net indices in 0..{cohort.num_nets - 1}")
        if costs.reachable(deadline_ms, flops) is None:
            ms, fl = costs.cost_to(0)
            raise XrossError(
                f"route {list(path)} cannot reach its first exit within the limits ({ms:.3g} ms, {fl:.3g} FLOPs "
                "needed); give more, or no path to let the runner choose"
            )
        self.costs = costs
        self.cohort = cohort.eval()
        self.deadline_ms = deadline_ms
        self.flops = flops
        self.clock = clock

    @classmethod
    def from_run(
        cls, run: str | Path, deadline_ms: float | None = None, flops: float | None = None, **options: Any
    ) -> AnytimeRunner:
        """A runner over a run directory's cohort (newest weights) and latency table (measured now if it has
        none for this device); without ``path`` the route is chosen by the accuracies in its ``eval.json``.

        ``options``: ``path``, ``clock``; ``trust_code`` and ``verify`` as for loading the run.
        """
        run = Path(run)
        trust_code, verify = options.pop("trust_code", False), options.pop("verify", True)
        _, cohort = load_run(run, trust_code=trust_code, verify=verify)
        table = latency_table(run, trust_code=trust_code, verify=verify)
        if options.get("path") is None:
            options["accuracy"] = accuracy_by_prefix(EvalResult.load(run / "eval.json"))
        return cls(cohort, table, deadline_ms, flops, **options)

    @torch.no_grad()
    def __call__(self, x: Any) -> Answer:
        costs, cohort = self.costs, self.cohort
        limit_ms = math.inf if self.deadline_ms is None else self.deadline_ms
        limit_flops = math.inf if self.flops is None else self.flops
        start = self.clock()
        value, spent_flops, stage, trace = x, 0.0, -1, []
        for k in range(len(costs.path)):
            elapsed = (self.clock() - start) * 1e3
            left = limit_ms - elapsed
            # a call running slower than the table (a busy machine) is expected to stay as slow
            slowdown = max(1.0, elapsed / sum(costs.step_ms[:k])) if k > 0 else 1.0
            need = (costs.step_ms[k] + costs.exit_ms[k]) * slowdown
            if k > 0 and (need > left or spent_flops + costs.step_flops[k] + costs.exit_flops[k] > limit_flops):
                break
            trace.append((k, left, need))
            value = cohort.step(costs.path[: k + 1], value)
            spent_flops += costs.step_flops[k]
            stage = k
        prefix = costs.path[: stage + 1]
        final = stage == len(costs.path) - 1
        logits = value if final else cohort.exits.logits(prefix, value)  # type: ignore[union-attr]
        spent_flops += costs.exit_flops[stage]
        return Answer(logits, prefix, (self.clock() - start) * 1e3, spent_flops, final, trace)
