"""xross.run.evaluate: sharded evaluation sums to the whole; results round-trip through JSON; Pareto front, best."""

from __future__ import annotations

import json

import torch

from xross.cohort.grid import Cohort
from xross.run.evaluate import EvalResult


def test_sharded_evaluation_with_summed_counts_equals_whole(cohort: Cohort) -> None:
    from xross.run.evaluate import evaluate

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 3, 16, 16, generator=g), torch.randint(0, 10, (5,), generator=g)) for _ in range(5)]
    whole = evaluate(cohort, batches, 16)
    # two "ranks": rank 1 sees batches 1, 3; rank 0 sees 0, 2, 4 and receives rank 1's counts in the reduce
    seen: list[torch.Tensor] = []
    empty = (torch.empty(0, 3, 16, 16), torch.empty(0, dtype=torch.int64))  # a rank's part of a short last batch
    evaluate(cohort, [*batches[1::2], empty], 16, reduce=lambda t: seen.append(t.clone()) or t)
    sharded = evaluate(cohort, batches[0::2], 16, reduce=lambda t: t + seen[0])
    assert sharded.samples == whole.samples == 25
    assert sharded == whole
    assert len({r.top1 for r in whole.paths}) > 1  # the paths differ, so a mixed-up unpacking would show


def test_eval_json_round_trip(tmp_path) -> None:
    from xross.run.evaluate import PathResult, best_path, pareto_front

    rows = [
        ((0, 0), "a>a", 70, 90, 21e6, 3e9),
        ((0, 1), "a>b", 69, 89, 15e6, 2e9),
        ((1, 0), "b>a", 66, 88, 17e6, 2.5e9),
        ((1, 1), "b>b", 68, 89, 11e6, 1e9),
    ]
    paths = [PathResult(path=p, name=n, top1=t1, top5=t5, params=int(c), flops=f) for p, n, t1, t5, c, f in rows]
    result = EvalResult.model_validate(
        {"paths": [r.model_dump() for r in paths], "ensembles": {"nets": {"top1": 71.0, "top5": 91.0}}, "samples": 100}
    )
    result.save(tmp_path / "e.json")
    assert EvalResult.load(tmp_path / "e.json") == result
    assert [r.path for r in pareto_front(paths)] == [(1, 1), (0, 1), (0, 0)]
    assert best_path(paths, max_params=16e6).path == (0, 1)
    assert best_path(paths, max_flops=1.5e9).path == (1, 1)
    assert json.loads((tmp_path / "e.json").read_text())["samples"] == 100
