"""The optimiser across a growth (xross.run.carry) against the rule written out by hand.

A small MLP trained a few steps (SGD with momentum, and Adam), then net2wider on its hidden layer from 4 to 7
units (copies uneven: some units copied once, some twice or more). For a hidden unit ``j`` that copies unit
``i`` (``c`` copies of ``i``, itself included), the rule (docs/RESEARCH.md) is: the first layer's row ``j``
(weight, bias, and a BatchNorm's weight and bias) gets ``m[i] / c`` (momentum buffer, Adam's exp_avg) and
``v[i] / c**2`` (exp_avg_sq); the second layer's column ``j`` keeps ``m[:, i]`` and ``v[:, i]``; what the
growth did not widen (the second bias) keeps its state; Adam's step count carries. Then the claim: the first
update after the growth moves each copy by its original's update times its gradient scale (SGD: ``1/c`` on the
rows, 1 on the columns) or by exactly its original's update (Adam).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import growth
from xross.run.carry import rebuild

OLD, NEW = 4, 7  # hidden units before and after


def mlp(batchnorm: bool) -> nn.Sequential:
    """Linear-ReLU-Linear, or Linear-BN-ReLU-Linear (no bias before the BatchNorm: its gradient would be 0, and
    Adam's step on it a ratio of rounding errors)."""
    torch.manual_seed(0)
    first = nn.Linear(5, OLD, bias=not batchnorm)
    layers = [first, *([nn.BatchNorm1d(OLD)] if batchnorm else []), nn.ReLU(), nn.Linear(OLD, 3)]
    return nn.Sequential(*layers).double()


def optimizer(kind: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01, eps=1e-30)  # eps negligible: a copy's step is its original's


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, other: nn.Parameter | None = None
) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if other is not None:
        other.grad = torch.randn(other.shape, dtype=other.dtype)
    opt.step()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(3, (16,), generator=g)


def trained(kind: str, batchnorm: bool) -> tuple[nn.Sequential, nn.Parameter, torch.optim.Optimizer]:
    """The MLP after 3 steps, with an ``other`` parameter the growth does not touch (another net's, say)."""
    model, other = mlp(batchnorm), nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = optimizer(kind, [*model.parameters(), other])
    for seed in range(3):
        x, y = batch(seed)
        train_step(model, opt, x, y, other)
    return model, other, opt


def grown_with_state(
    kind: str, batchnorm: bool, mode: str
) -> tuple[nn.Sequential, nn.Module, nn.Parameter, torch.optim.Optimizer, torch.optim.Optimizer]:
    model, other, opt = trained(kind, batchnorm)
    x, _ = batch(10)
    steps = [growth.MutationRecord(op="net2wider", site="0", args={"new_width": NEW, "seed": 5})]
    grown = growth.grow_steps(model, steps, x)
    origins = growth.lineage(model, steps, x).origins(model, grown)
    new_opt = rebuild(opt, optimizer(kind, [*grown.parameters(), other]), origins, mode)
    return model, grown, other, opt, new_opt


def copied_units(model: nn.Module, grown: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Which old hidden unit each new one copies (read off the grown first layer's rows), and each one's copies."""
    old_rows, new_rows = model.get_parameter("0.weight").detach(), grown.get_parameter("0.weight").detach()
    index = torch.tensor([next(i for i in range(OLD) if torch.equal(row, old_rows[i])) for row in new_rows])
    return index, torch.bincount(index, minlength=OLD).double()


def widened(model: nn.Module, batchnorm: bool) -> list[nn.Parameter]:
    """The parameters whose rows are the hidden units: the first Linear's (and the BatchNorm's)."""
    return [p for name, p in model.named_parameters() if name.startswith(("0.", "1.") if batchnorm else "0.")]


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-13) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["linear-relu-linear", "linear-bn-relu-linear"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_carried_state_is_the_written_out_rule(kind, batchnorm) -> None:
    model, grown, other, opt, new_opt = grown_with_state(kind, batchnorm, "carry")
    index, copies = copied_units(model, grown)
    assert index[:OLD].tolist() == list(range(OLD)) and sorted(set(copies.tolist())) != [copies[0].item()]  # uneven
    reader = str(len(model) - 1)  # the second Linear
    c = copies[index]
    first = ["momentum_buffer"] if kind == "sgd" else ["exp_avg"]
    for old, new in zip(widened(model, batchnorm), widened(grown, batchnorm)):
        was, now = opt.state[old], new_opt.state[new]
        shape = (-1,) + (1,) * (old.dim() - 1)
        for key in first:
            assert close(now[key], was[key][index] / c.view(shape)), key  # m[i] / c
        if kind == "adam":
            assert close(now["exp_avg_sq"], was["exp_avg_sq"][index] / c.view(shape) ** 2)  # v[i] / c**2
            assert torch.equal(now["step"], was["step"])
    was, now = (
        opt.state[model.get_parameter(f"{reader}.weight")],
        new_opt.state[grown.get_parameter(f"{reader}.weight")],
    )
    for key in first + (["exp_avg_sq"] if kind == "adam" else []):
        assert torch.equal(now[key], was[key][:, index]), key  # the columns keep m[:, i] (and v[:, i])
    was, now = opt.state[model.get_parameter(f"{reader}.bias")], new_opt.state[grown.get_parameter(f"{reader}.bias")]
    for key in was:
        assert torch.equal(now[key], was[key]), key  # not widened: unchanged
    assert new_opt.state[other] is not opt.state[other] and new_opt.state[other].keys() == opt.state[other].keys()
    for key in opt.state[other]:
        assert torch.equal(new_opt.state[other][key], opt.state[other][key])


@pytest.mark.parametrize("batchnorm", [False, True], ids=["linear-relu-linear", "linear-bn-relu-linear"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_first_update_after_growth_is_the_originals_scaled_by_the_gradient_scale(kind, batchnorm) -> None:
    model, grown, other, opt, new_opt = grown_with_state(kind, batchnorm, "carry")
    index, copies = copied_units(model, grown)
    old_model, old_opt = copy.deepcopy((model, opt))  # the old net's own next step, for reference
    x, y = batch(20)
    before_old = [p.detach().clone() for p in old_model.parameters()]
    before_new = [p.detach().clone() for p in grown.parameters()]
    train_step(old_model, old_opt, x, y)
    train_step(grown, new_opt, x, y)
    old_delta = [p.detach() - b for p, b in zip(old_model.parameters(), before_old)]
    new_delta = [p.detach() - b for p, b in zip(grown.parameters(), before_new)]
    scale = 1 / copies[index] if kind == "sgd" else torch.ones(NEW, dtype=torch.float64)  # rows: 1/c with SGD
    reader = len(old_delta) - 2  # the second Linear's weight, then its bias
    for k in range(reader):  # the widened rows: first Linear's weight and bias, BatchNorm's weight and bias
        shape = (-1,) + (1,) * (old_delta[k].dim() - 1)
        assert close(new_delta[k], old_delta[k][index] * scale.view(shape), rtol=1e-9), k
    assert close(new_delta[reader], old_delta[reader][:, index], rtol=1e-9)  # columns: scale 1, either optimiser
    assert close(new_delta[reader + 1], old_delta[reader + 1], rtol=1e-9)
    assert float(old_delta[0].abs().min()) > 0  # every element moved: the comparison means something


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reset_gives_the_grown_parameters_no_state(kind) -> None:
    _, grown, other, opt, new_opt = grown_with_state(kind, False, "reset")
    assert all(p not in new_opt.state for p in grown.parameters())
    assert new_opt.state[other].keys() == opt.state[other].keys()  # what the growth did not touch keeps its own
