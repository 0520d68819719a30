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

from surgery.errors import SurgeryError
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
            raise SurgeryError(f"cannot read evaluation {path}: {e}; run `xross eval` again") from None


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


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
                was = m.training
                h = m.eval()(h)
                m.train(was)
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
    was = cohort.training
    cohort.eval()
    counts = {p: [0, 0] for p in paths}
    ens = {"nets": [0, 0], "all_paths": [0, 0]}
    n = 0
    device = next(cohort.parameters()).device
    try:
        for images, labels in batches:
            if len(labels) == 0:  # a rank's part of a short last batch
                continue
            logits = cohort.forward_paths(images, list(dict.fromkeys([*paths, *own])))
            for p in paths:
                c1, c5 = _topk_correct(logits[p].float(), labels)
                counts[p][0] += c1
                counts[p][1] += c5
            for name, members in (("nets", own), ("all_paths", paths)):
                probs = torch.stack([logits[p].float().softmax(1) for p in members]).mean(0)
                c1, c5 = _topk_correct(probs, labels)
                ens[name][0] += c1
                ens[name][1] += c5
            n += len(labels)
    finally:
        cohort.train(was)
    if reduce is not None:
        n, counts, ens = _reduce_counts(reduce, n, counts, ens)
    if n == 0:
        raise SurgeryError("the evaluation set is empty")
    costs = path_costs(cohort, paths, image_size, device)
    results = [PathResult(p, cohort.path_name(p), 100 * c[0] / n, 100 * c[1] / n, *costs[p]) for p, c in counts.items()]
    return EvalResult(results, {k: {"top1": 100 * v[0] / n, "top5": 100 * v[1] / n} for k, v in ens.items()}, n)


def _reduce_counts(
    reduce: Callable[[torch.Tensor], torch.Tensor], n: int, counts: dict[Path, list[int]], ens: dict[str, list[int]]
) -> tuple[int, dict[Path, list[int]], dict[str, list[int]]]:
    """The counts summed by ``reduce`` (e.g. over ranks), packed into one int64 tensor and back."""
    packed = torch.tensor([n, *(c for v in counts.values() for c in v), *(c for v in ens.values() for c in v)], dtype=torch.int64)
    total = reduce(packed).tolist()
    n, rest = total[0], total[1:]
    counts = {p: rest[2 * i : 2 * i + 2] for i, p in enumerate(counts)}
    rest = rest[2 * len(counts) :]
    ens = {k: rest[2 * i : 2 * i + 2] for i, k in enumerate(ens)}
    return n, counts, ens


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
        raise SurgeryError(
            f"no path fits the budget (max params {human(max_params) if max_params else '-'}, max FLOPs "
            f"{human(max_flops) if max_flops else '-'}); the smallest path '{smallest.name}' has "
            f"{human(smallest.params)} params and {human(smallest.flops)} FLOPs"
        )
    return max(fits, key=lambda r: (r.top1, -r.params))
