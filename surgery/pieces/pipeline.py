"""Pieces as pipeline stages: cut a model where the stages balance, and run them on torch's own schedules.

``torch.distributed.pipelining`` runs stages the user builds (``PipelineStage``) with
its schedules (GPipe, 1F1B, interleaved, zero bubble); its automatic splitter traces the
model with torch.export and fails on many Hugging Face models (rotary tables outlined
twice, tied weights, lifted tensors). Pieces already are exact stages: every live value
(hidden states, masks, rotary tables, position ids) crosses a cut as a stage's inputs and
outputs, and the first piece takes the model's own call (``input_ids=``).

* :func:`pipeline` cuts ``model`` at its layer stack into ``n_stages`` contiguous runs of
  layers whose FLOPs (or parameters, or measured latency) balance, and reports each
  stage's share and the imbalance.
* :meth:`StagePlan.stage` is this rank's ``PipelineStage``; the last stage returns the
  logits of a Hugging Face output (what a loss takes).
* A parameter held by several stages (GPT-2's ``wte`` is also its ``lm_head``) is a copy
  on each of their ranks: :meth:`StagePlan.tied` sums its gradients over those ranks after
  the backward passes, so identical updates keep the copies equal, i.e. tied.

>>> import torch, transformers, surgery
>>> config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
>>> gpt2 = transformers.GPT2LMHeadModel(config).eval()
>>> plan = surgery.pipeline(gpt2, 2, {"input_ids": torch.randint(0, 64, (2, 8))})
>>> plan.cuts, len(plan.stages), len(plan.pieces), [name for name, _ in plan.tied_parameters()]
(['transformer.h.1'], 2, 4, ['pieces.0.lm_head.weight'])
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.core.util import evaluating
from surgery.graph.flops import count_flops, count_params
from surgery.graph.inputs import Example
from surgery.pieces.cut import Pieces, cut

BALANCES = ("flops", "params", "latency")


def layer_stack(model: nn.Module) -> list[str]:
    """The paths of the layers of ``model``'s longest stack of layers (a ModuleList or Sequential)."""
    best: list[str] = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > len(best):
            best = [f"{path}.{k}" if path else str(k) for k in range(len(module))]
    if len(best) < 2:
        raise SurgeryError(f"{type(model).__name__} has no stack of layers to split into stages; give layers=")
    return best


def partition(costs: Sequence[float], parts: int) -> list[int]:
    """Where to split ``costs`` into ``parts`` contiguous runs with the smallest largest sum: the runs' starts."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise SurgeryError(f"cannot split {n} layers into {parts} stages; give between 1 and {n} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[p][i]: first i units in p runs
    start = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                value = max(best[p - 1][j], prefix[i] - prefix[j])
                if value < best[p][i]:
                    best[p][i], start[p][i] = value, j
    starts, i = [], n
    for p in range(parts, 0, -1):
        i = start[p][i]
        starts.append(i)
    return sorted(starts)


def _latency(piece: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    times = []
    with torch.no_grad():
        for _ in range(3):
            began = time.perf_counter()
            piece(*args, **kwargs)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def layer_costs(pieces: Pieces, example: Example, balance: str) -> list[float]:
    """Each piece's cost: forward FLOPs on ``example``, parameters, or median latency of 3 runs."""
    if balance not in BALANCES:
        raise SurgeryError(f"balance='{balance}' is not one of {', '.join(BALANCES)}")
    if balance == "params":
        return [float(count_params(p)) for p in pieces]
    costs = []
    for k, piece, args, _ in pieces._walk(example):
        call_args, call_kwargs = (example.args, example.kwargs) if k == 0 else (args, {})
        if balance == "flops":
            costs.append(float(count_flops(piece, *call_args, **call_kwargs)))
        else:
            costs.append(_latency(piece, tuple(call_args), dict(call_kwargs)))
    return costs


class _StageModule(nn.Module):
    """A piece as a stage: tensors in, tensors out (a Hugging Face output gives its logits at the last stage)."""

    def __init__(self, piece: nn.Module, last: bool):
        super().__init__()
        self.piece, self.last = piece, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.piece.run(*args, **kwargs) if isinstance(self.piece, Pieces) else self.piece(*args, **kwargs)
        if not self.last or isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise SurgeryError(f"the last stage returns a {type(out).__name__}; a pipeline stage must return tensors")


@dataclass
class StagePlan:
    """A model cut at every layer (``pieces``, whose composition is the model) and grouped into stages.

    ``stages[i]`` is the run of pieces stage ``i`` computes, ``cuts`` the layers the stages
    end at, ``costs`` each stage's cost (``balance``), ``unit_costs`` each piece's.

    >>> import torch, surgery
    >>> from surgery.pieces.pipeline import StagePlan
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
    >>> plan = StagePlan(surgery.cut(net, ["0", "1", "2"]), [0, 2], [1.0, 1.0, 1.0, 3.0], "flops")
    >>> plan.cuts, plan.costs, round(plan.imbalance, 2)
    (['1'], [2.0, 4.0], 0.33)
    """

    pieces: Pieces
    starts: list[int]
    unit_costs: list[float]
    balance: str
    layers: list[str] = field(default_factory=list)

    @property
    def stages(self) -> list[Pieces]:
        ends = [*self.starts[1:], len(self.pieces)]
        return [self.pieces[a:b] for a, b in zip(self.starts, ends)]

    @property
    def cuts(self) -> list[str]:
        return [self.pieces.cuts[s - 1] for s in self.starts[1:]]

    @property
    def costs(self) -> list[float]:
        ends = [*self.starts[1:], len(self.unit_costs)]
        return [sum(self.unit_costs[a:b]) for a, b in zip(self.starts, ends)]

    @property
    def shares(self) -> list[float]:
        total = sum(self.costs) or 1.0
        return [c / total for c in self.costs]

    @property
    def imbalance(self) -> float:
        mean = statistics.fmean(self.costs)
        return max(self.costs) / mean - 1 if mean else 0.0

    def tied_parameters(self) -> list[tuple[str, dict[int, str]]]:
        """Parameters several stages hold: the name in the first stage holding it, and its name in each stage."""
        holders: dict[int, dict[int, str]] = {}
        for stage, piece in enumerate(self.stages):
            for name, param in piece.named_parameters(remove_duplicate=True):
                holders.setdefault(id(param), {}).setdefault(stage, name)
        return [(names[min(names)], names) for names in holders.values() if len(names) > 1]

    def stage(self, index: int, device: torch.device | str, group: Any = None) -> Any:
        """The ``PipelineStage`` of stage ``index`` (run on ``device``, in ``group``: default the world)."""
        from torch.distributed.pipelining import PipelineStage

        stages = self.stages
        module = _StageModule(stages[index], last=index == len(stages) - 1).to(device)
        return PipelineStage(module, index, len(stages), torch.device(device), group=group)

    def tied(self, index: int) -> TiedGradients:
        """The gradient reduction of stage ``index``'s shared parameters; build it on every rank (it makes groups)."""
        return TiedGradients(self, index)


class TiedGradients:
    """Sums the gradients of parameters several stages hold over the ranks holding them (stage i on rank i).

    Made on every rank in the same order (``torch.distributed.new_group`` is collective);
    call it after the schedule's step and before the optimiser's.
    """

    def __init__(self, plan: StagePlan, index: int):
        import torch.distributed as dist

        self.reductions: list[tuple[nn.Parameter, Any]] = []
        params = dict(plan.stages[index].named_parameters(remove_duplicate=True))
        for _, names in plan.tied_parameters():
            group = dist.new_group(ranks=sorted(names))
            if index in names:
                self.reductions.append((params[names[index]], group))

    def __call__(self) -> None:
        import torch.distributed as dist

        for param, group in self.reductions:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)


def pipeline(
    model: nn.Module,
    n_stages: int,
    example_input: Any,
    balance: str = "flops",
    layers: Sequence[str] | None = None,
) -> StagePlan:
    """Cut ``model`` into ``n_stages`` pieces at its layer stack, balanced by ``balance``.

    Args:
        model: any model :func:`surgery.cut` takes (captured with fx or torch.export).
        n_stages: how many stages (at most the number of layers).
        example_input: the model's input (a tensor, a dict of keyword inputs, an Example):
            costs are measured on it and the stages' boundaries traced with it.
        balance: ``"flops"`` (forward FLOPs), ``"params"`` or ``"latency"`` (measured here).
        layers: the layer paths whose boundaries may be cut (default: the longest layer stack).

    >>> import torch, surgery
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    >>> plan = surgery.pipeline(net, 3, torch.randn(2, 8))
    >>> plan.cuts, [round(s, 2) for s in plan.shares]
    (['1', '3'], [0.33, 0.33, 0.33])
    """
    example = Example.of(example_input)
    if example is None:
        raise SurgeryError("pipeline needs example_input: the stages' costs are measured on it")
    stack = list(layers) if layers is not None else layer_stack(model)
    if balance not in BALANCES:
        raise SurgeryError(f"balance='{balance}' is not one of {', '.join(BALANCES)}")
    if not 1 <= n_stages <= len(stack):
        raise SurgeryError(f"cannot split {len(stack)} layers into {n_stages} stages; give between 1 and {len(stack)}")
    with evaluating(model):
        pieces = cut(model, stack[:-1], example)
        costs = layer_costs(pieces, example, balance)
    return StagePlan(pieces, partition(costs, n_stages), costs, balance, stack)
