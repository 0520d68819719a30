"""surgery.pipeline: pieces as torch.distributed.pipelining stages, balanced, exact against the unsplit model."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgery
from surgery.core.errors import SurgeryError
from surgery.pieces.pipeline import partition

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


def _gpt2(layers: int) -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("costs", [[1, 2, 3, 4, 5], [5, 1, 1, 1, 5, 2], [3, 3, 3, 3], [1, 9, 1, 1, 1, 1, 9]])
def test_partition_is_the_best_contiguous_split(costs: list[int]) -> None:
    for parts in range(1, len(costs) + 1):
        starts = partition(costs, parts)
        assert starts[0] == 0 and len(starts) == parts and starts == sorted(set(starts))
        worst = max(sum(costs[a:b]) for a, b in zip(starts, [*starts[1:], len(costs)]))
        best = min(
            max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, len(costs))))
            for cut in itertools.combinations(range(1, len(costs)), parts - 1)
        )
        assert worst == best


def test_twelve_layer_gpt2_balanced_by_flops_within_ten_percent() -> None:
    ids = {"input_ids": torch.randint(0, 64, (2, 16))}
    for stages in (2, 4):
        plan = surgery.pipeline(_gpt2(12), stages, ids, balance="flops")
        assert len(plan.stages) == stages and len(plan.cuts) == stages - 1
        assert plan.imbalance <= 0.10, (stages, plan.shares)
        assert abs(sum(plan.shares) - 1) < 1e-12
        assert plan.layers == [f"transformer.h.{k}" for k in range(12)]


def test_pipeline_pieces_compose_to_the_model_and_keep_the_tie() -> None:
    model = _gpt2(4)
    ids = torch.randint(0, 64, (3, 10))
    plan = surgery.pipeline(model, 2, {"input_ids": ids[:2]}, balance="params")
    assert torch.equal(plan.pieces(ids).logits, model(ids).logits)  # another batch size and length
    first, second = plan.stages
    assert torch.equal(second.run(*_as_tuple(first.run(ids))).logits, model(ids).logits)
    (name, holders), *rest = plan.tied_parameters()
    assert not rest and sorted(holders) == [0, 1]
    assert dict(first.named_parameters())[holders[0]] is model.transformer.wte.weight
    assert dict(second.named_parameters())[holders[1]] is model.transformer.wte.weight


def _as_tuple(value: object) -> tuple:
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize(
    ("stages", "balance", "error"),
    [(5, "flops", "cannot split 4 layers into 5 stages"), (2, "speed", "is not one of flops, params, latency")],
)
def test_pipeline_refusals_are_one_line(stages: int, balance: str, error: str) -> None:
    with pytest.raises(SurgeryError, match=error):
        surgery.pipeline(_gpt2(4), stages, {"input_ids": torch.randint(0, 64, (2, 8))}, balance=balance)


def _torchrun(family: str, schedule: str, microbatches: int, nproc: int, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    worker = [str(ROOT / "tests" / "pipeline_worker.py"), family, schedule, str(microbatches), str(out)]
    done = subprocess.run([*command, *worker], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize(
    ("family", "schedule", "microbatches", "nproc"),
    [("gpt2", "1f1b", 4, 2), ("llama", "gpipe", 2, 2), ("resnet", "1f1b", 2, 2), ("llama", "1f1b", 4, 4)],
)
def test_pipelined_step_equals_the_unsplit_model(family, schedule, microbatches, nproc, tmp_path) -> None:
    """Loss (last stage), every parameter's gradient and one SGD step equal the unsplit model's (float64)."""
    ranks = _torchrun(family, schedule, microbatches, nproc, tmp_path)
    assert ranks[-1]["loss_diff"] <= 1e-9
    for record in ranks:
        assert record["grad_diff"] <= 1e-9 and record["step_diff"] <= 1e-9, record
        assert record["missing_grads"] == [] and record["params"] > 0
    assert len({tuple(r["cuts"]) for r in ranks}) == 1 and len(ranks[0]["cuts"]) == nproc - 1
    if family == "gpt2":  # the embedding is also the head: both stages hold it, its gradients were summed
        assert ranks[0]["tied"] == ["pieces.0.lm_head.weight"]
