"""One rank of ``bench/pipeline.py``: a pipelined 1F1B training step checked against the unsplit model, or timed.

    torchrun --nproc_per_node=S bench/pipeline_rank.py check FAMILY OUT   # ours and torch's splitter, S stages
    torchrun --nproc_per_node=S bench/pipeline_rank.py speed STEPS OUT    # tokens/s, S = 1 (unsplit) or 2

``check``: every rank builds the same model of ``transformers_zoo.FAMILIES`` (seeded, float64,
eval mode: no dropout, so micro-batches compute what the whole batch does), computes the
unsplit loss (mean squared error against a seeded random target of the output's shape) and
gradients itself, then runs one ``Schedule1F1B`` step (4 micro-batches) of its stage, twice:
from ``surgery.pipeline(model, S, ..., balance="flops")`` with the tied parameters' gradients
summed (``plan.tied``), and from torch's own splitter, ``torch.distributed.pipelining.pipeline``
with ``SplitPoint.END`` at the same layers (``plan.cuts``). ``OUT/rank{r}.json`` holds, for each,
the loss's and the gradients' largest relative differences, the parameters checked, or the
one-line error. A failure on one rank is shared (all-gathered) before the next collective step.

``speed``: an 8-layer GPT-2 of width 256 (float32, batch 8 x 128 tokens, AdamW); S = 1 trains it
unsplit, S = 2 as two stages under 1F1B with 4 micro-batches; ``OUT/speed{S}.json`` holds the
median step time over ranks (the slowest rank's) and tokens/s.
"""

from __future__ import annotations

import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import Schedule1F1B, SplitPoint
from torch.distributed.pipelining import pipeline as torch_pipeline
from transformers_zoo import FAMILIES
from zoo_calls import error_line

import surgery
from growth.check import vary_constant_weights
from surgery.graph.inputs import Example

BATCH, MICROBATCHES = 8, 4


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def head(out: Any) -> torch.Tensor:
    """The tensor a loss takes: the output itself, its logits, or its first tensor (a last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out[0]


class Head(nn.Module):
    """The model returning :func:`head` of its output (torch's splitter needs tensors out)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return head(self.model(*args, **kwargs))


def build(name: str) -> tuple[nn.Module, Example, list[str]]:
    """The family's model (float64, eval), a batch of its inputs and its layers' paths."""
    family = next(f for f in FAMILIES if f.name == name)
    torch.manual_seed(0)
    model = surgery.build_model(family.source, **family.kwargs).eval()
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False
    vary_constant_weights(model, torch.Generator().manual_seed(0))
    model = model.double()
    example = family.example(BATCH, family.lengths[0])
    example = Example(*(_double(v) for v in (example.args, example.kwargs)))
    stack = model.get_submodule(family.layers)
    return model, example, [f"{family.layers}.{k}" for k in range(len(stack))]


def _double(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    return type(value)(_double(v) for v in value)


def _agree(ok: bool, error: str | None) -> str | None:
    """Every rank's error, shared: the first one found on any rank (None when all ranks are fine)."""
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if ok else f"rank {dist.get_rank()}: {error}")
    return next((e for e in errors if e), None)


def _step(stage: Any, example: Example, target: torch.Tensor) -> float | None:
    """One 1F1B step of ``stage``; the mean micro-batch loss on the last rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run = Schedule1F1B(stage, n_microbatches=MICROBATCHES, loss_fn=loss_fn)
    losses: list[torch.Tensor] = []
    if rank == 0:
        run.step(*example.args, **example.kwargs)
    elif rank == world - 1:
        run.step(target=target, losses=losses)
    else:
        run.step()
    return float(torch.stack(losses).mean()) if losses else None


def _compare(params: dict[str, nn.Parameter], reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The largest relative gradient difference over ``params`` (canonical name -> parameter).

    Relative to the parameter's largest unsplit gradient, floored at 1e-6 of the model's largest:
    a gradient that is zero up to rounding (a key bias, which softmax cancels) has no scale of its own.
    """
    worst, worst_name, missing = 0.0, "", []
    floor = 1e-6 * max(float(g.abs().max()) for g in reference.values())
    for name, param in params.items():
        ref = reference[name]
        if param.grad is None:
            if ref.abs().max() > 0:
                missing.append(name)
            continue
        scale = max(float(ref.abs().max()), floor)
        diff = float((param.grad - ref).abs().max())
        if (diff / scale if scale else diff) > worst:
            worst, worst_name = diff / scale if scale else diff, name
    return {"grad_rel": worst, "worst": worst_name, "missing": missing, "checked": sorted(params)}


def check(name: str) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict[str, Any] = {"rank": rank}
    model, example, layers = build(name)
    reference = copy.deepcopy(model)
    output = head(reference(*example.args, **example.kwargs))
    target = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    ref_loss = loss_fn(output, target)
    ref_loss.backward()
    ref_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in reference.named_parameters()}
    canonical = {id(p): n for n, p in model.named_parameters()}
    every = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    record["params"] = sorted(ref_grads)
    micro = Example(*(_first_rows(v, BATCH // MICROBATCHES) for v in (example.args, example.kwargs)))

    plan, stage, tied, error, cuts = None, None, None, None, None
    try:
        plan = surgery.pipeline(model, world, micro, balance="flops", layers=layers)
        stage, tied = plan.stage(rank, "cpu"), plan.tied(rank)
        cuts = plan.cuts
        record.update(cuts=cuts, shares=plan.shares, imbalance=plan.imbalance)
    except Exception as e:  # noqa: BLE001 - a bench records failures instead of stopping
        error = error_line(e)
    record["ours"] = _run_ours(stage, tied, error, example, target)
    if "error" not in record["ours"]:
        record["ours"].update(_compare({canonical[id(p)]: p for p in plan.stages[rank].parameters()}, ref_grads))
        loss = record["ours"].pop("loss")
        if loss is not None:
            record["ours"]["loss_rel"] = abs(loss - float(ref_loss)) / abs(float(ref_loss))

    for p in model.parameters():
        p.grad = None
    if cuts is None:  # the same split points as ours; without a plan, the balanced cut of the layer count
        cuts = [layers[len(layers) * (k + 1) // world - 1] for k in range(world - 1)]
    record["torch"] = _run_torch(model, cuts, micro, example, target, every, ref_grads)
    if "loss" in record["torch"]:
        loss = record["torch"].pop("loss")
        record["torch"]["loss_rel"] = abs(loss - float(ref_loss)) / abs(float(ref_loss))
    return record


def _first_rows(value: Any, rows: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:rows]
    if isinstance(value, dict):
        return {k: _first_rows(v, rows) for k, v in value.items()}
    return type(value)(_first_rows(v, rows) for v in value)


def _run_ours(stage: Any, tied: Any, error: str | None, example: Example, target: torch.Tensor) -> dict:
    shared = _agree(error is None, error)
    if shared:
        return {"error": f"plan: {shared}"}
    loss, error = None, None
    try:
        loss = _step(stage, example, target)
        tied()
    except Exception as e:  # noqa: BLE001
        error = error_line(e)
    shared = _agree(error is None, error)
    return {"error": f"step: {shared}"} if shared else {"loss": loss}


def _run_torch(
    model: nn.Module,
    cuts: list[str],
    micro: Example,
    example: Example,
    target: torch.Tensor,
    every: dict[str, str],
    ref_grads: dict[str, torch.Tensor],
) -> dict[str, Any]:
    rank = dist.get_rank()
    error, stage, module = None, None, None
    try:
        split = {f"model.{cut}": SplitPoint.END for cut in cuts}
        pipe = torch_pipeline(Head(model), tuple(micro.args), dict(micro.kwargs), split_spec=split)
        if pipe.num_stages != dist.get_world_size():
            raise RuntimeError(f"{pipe.num_stages} stages for {dist.get_world_size()} ranks")
        stage = pipe.build_stage(rank, torch.device("cpu"))
        module = pipe.get_stage_module(rank)
    except Exception as e:  # noqa: BLE001
        error = error_line(e)
    shared = _agree(error is None, error)
    if shared:
        return {"error": f"build: {shared}"}
    loss = None
    try:
        loss = _step(stage, example, target)
    except Exception as e:  # noqa: BLE001
        error = error_line(e)
    shared = _agree(error is None, error)
    if shared:
        return {"error": f"step: {shared}"}
    params = {every[n.removeprefix("model.")]: p for n, p in module.named_parameters()}
    return {**_compare(params, ref_grads), **({"loss": loss} if loss is not None else {})}


def speed(steps: int) -> dict[str, Any]:
    import transformers

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=8, n_embd=256, n_head=8, vocab_size=256, n_positions=128)
    model = transformers.GPT2LMHeadModel(config).train()
    model.config.use_cache = False
    ids = torch.randint(0, 256, (BATCH, 128))
    targets = torch.randint(0, 256, (BATCH, 128))

    def ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    if world == 1:
        params = list(model.parameters())

        def step() -> None:
            ce(model(input_ids=ids).logits, targets).backward()
    else:
        plan = surgery.pipeline(model, world, {"input_ids": ids[: BATCH // MICROBATCHES]}, balance="flops")
        stage, tied = plan.stage(rank, "cpu"), plan.tied(rank)
        run = Schedule1F1B(stage, n_microbatches=MICROBATCHES, loss_fn=ce)
        params = list(plan.stages[rank].parameters())

        def step() -> None:
            if rank == 0:
                run.step(input_ids=ids)
            else:
                run.step(target=targets)
            tied()

    optimizer = torch.optim.AdamW(params, lr=1e-3)
    times = []
    for _ in range(steps + 2):  # the first 2 warm up
        dist.barrier()
        began = time.perf_counter()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = torch.tensor([time.perf_counter() - began])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    median = statistics.median(times[2:])
    return {"world": world, "step_s": median, "tokens_per_s": BATCH * 128 / median, "times": times}


def main() -> None:
    mode, what, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    record = check(what) if mode == "check" else speed(int(what))
    out.mkdir(parents=True, exist_ok=True)
    name = f"rank{dist.get_rank()}.json" if mode == "check" else f"speed{dist.get_world_size()}.json"
    if mode == "check" or dist.get_rank() == 0:
        (out / f"{name}.tmp").write_text(json.dumps(record))
        (out / f"{name}.tmp").replace(out / name)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
