"""Evaluate every stitched path of a cohort, ensembles, the Pareto front, and budgets.

>>> from xross.evaluate import PathResult, best_path
>>> results = [PathResult((0, 0), "a > a", 70.0, 90.0, 21_000_000, 3e9),
...            PathResult((1, 1), "b > b", 68.0, 89.0, 11_000_000, 1e9)]
>>> best_path(results, max_params=12e6).path
(1, 1)
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path as FsPath
from typing import Any

import torch

from xross.errors import XrossError
from surgery._util import evaluating
from surgery.flops import count_flops, count_params, human
from xross.cohort import Cohort, Path


@dataclasses.dataclass
class PathResult:
    path: Path
    name: str
    top1: float
    top5: float
    params: int
    flops: float  # forward FLOPs per image

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": list(self.path)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PathResult:
        return cls(**{**d, "path": tuple(d["path"])})


@dataclasses.dataclass
class EvalResult:
    paths: list[PathResult]
    ensembles: dict[str, dict[str, float]]  # name -> {"top1":, "top5":}
    samples: int

    def own(self, net: int, num_parts: int) -> PathResult:
        return next(r for r in self.paths if r.path == (net,) * num_parts)

    def to_json(self) -> dict[str, Any]:
        return {"paths": [r.to_json() for r in self.paths], "ensembles": self.ensembles, "samples": self.samples}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalResult:
        return cls([PathResult.from_json(r) for r in d["paths"]], d["ensembles"], d["samples"])

    def save(self, path: FsPath) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: FsPath) -> EvalResult:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise XrossError(f"cannot read evaluation {path}: {e}; run `xross eval` again") from None


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many of ``labels`` are the top-1 and among the top-5 of ``logits``: an int64 pair on the CPU."""
    k = min(5, logits.shape[1])
    hit = logits.topk(k, dim=1).indices == labels[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).cpu()


def path_costs(cohort: Cohort, paths: Iterable[Path], image_size: int, device: torch.device | str = "cpu") -> dict[Path, tuple[int, float]]:
    """(parameters, forward FLOPs per image) of each path; FLOPs of each part counted once."""
    x = torch.zeros(1, 3, image_size, image_size, device=device, dtype=next(cohort.parameters()).dtype)
    flops: dict[int, float] = {}
    out: dict[Path, tuple[int, float]] = {}
    with torch.no_grad():
        for path in paths:
            h = x
            total = 0.0
            for m in cohort.modules_of(path):
                if id(m) not in flops:
                    flops[id(m)] = count_flops(m, h)
                total += flops[id(m)]
                with evaluating(m):
                    h = m(h)
            out[path] = (count_params(cohort.modules_of(path)), total)
    return out


@torch.no_grad()
def evaluate(
    cohort: Cohort,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    image_size: int,
    paths: Sequence[Path] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Top-1/top-5 (%) of every path (default all K**P) plus ensembles, in eval mode.

    Ensembles average softmax outputs: ``nets`` over the K full networks,
    ``all_paths`` over every evaluated path. In a distributed run each rank passes its
    shard of ``batches`` and a ``reduce`` that sums a tensor of counts over the ranks,
    so every rank returns the result on the whole evaluation set.
    """
    paths = list(paths) if paths is not None else cohort.paths()
    own = [cohort.own_path(i) for i in range(cohort.num_nets)]
    ensembles = {"nets": own, "all_paths": paths}
    # correct predictions: a row per path, then per ensemble; columns top-1, top-5
    hits = torch.zeros(len(paths) + len(ensembles), 2, dtype=torch.int64)
    n = 0
    device = next(cohort.parameters()).device
    with evaluating(cohort):
        for images, labels in batches:
            if len(labels) == 0:  # a rank's part of a short last batch
                continue
            logits = cohort.forward_paths(images, list(dict.fromkeys([*paths, *own])))
            for row, p in enumerate(paths):
                hits[row] += _topk_correct(logits[p].float(), labels)
            for row, members in enumerate(ensembles.values(), start=len(paths)):
                probs = torch.stack([logits[p].float().softmax(1) for p in members]).mean(0)
                hits[row] += _topk_correct(probs, labels)
            n += len(labels)
    if reduce is not None:
        total = reduce(torch.cat([hits.flatten(), torch.tensor([n])]))
        hits, n = total[:-1].view_as(hits), int(total[-1])
    if n == 0:
        raise XrossError("the evaluation set is empty")
    pct = [[100 * c / n for c in row] for row in hits.tolist()]
    costs = path_costs(cohort, paths, image_size, device)
    results = [PathResult(p, cohort.path_name(p), *pct[row], *costs[p]) for row, p in enumerate(paths)]
    return EvalResult(results, {k: dict(zip(("top1", "top5"), pct[len(paths) + i])) for i, k in enumerate(ensembles)}, n)


def pareto_front(results: Sequence[PathResult], cost: str = "params") -> list[PathResult]:
    """Paths no other path beats on both top-1 and ``cost`` (``params`` or ``flops``), cheapest first."""
    ordered = sorted(results, key=lambda r: (getattr(r, cost), -r.top1))
    front, best = [], float("-inf")
    for r in ordered:
        if r.top1 > best:
            front.append(r)
            best = r.top1
    return front


def best_path(results: Sequence[PathResult], max_params: float | None = None, max_flops: float | None = None) -> PathResult:
    """The most accurate path within the budget (ties: fewer parameters)."""
    fits = [r for r in results if (max_params is None or r.params <= max_params) and (max_flops is None or r.flops <= max_flops)]
    if not fits:
        smallest = min(results, key=lambda r: (r.params, r.flops))
        raise XrossError(
            f"no path fits the budget (max params {human(max_params) if max_params else '-'}, max FLOPs "
            f"{human(max_flops) if max_flops else '-'}); the smallest path '{smallest.name}' has "
            f"{human(smallest.params)} params and {human(smallest.flops)} FLOPs"
        )
    return max(fits, key=lambda r: (r.top1, -r.params))
