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
from typing import Any, cast

import pytest
import torch
from torch import nn

import growth
import xross
from xross.run.carry import rebuild
from xross.run.engine import RunEngine

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


# --- the same rule through the engine, as a run does it ------------------------------------------------

VGG = "growth.models:small_vgg(widths=[8, 16], image_size=8)"
ROWS = ("features.0.block.conv.weight", "features.0.block.bn.weight", "features.0.block.bn.bias")
COLUMNS = "features.1.block.conv.weight"


def _named_state(engine: RunEngine) -> dict[str, dict[str, torch.Tensor]]:
    """The engine's optimiser state by parameter name (net 0's own names), copied; and its weights under ``w:``."""
    trainer = cast(Any, engine)
    out = {}
    for name, p in trainer.cohort.wholes[0].named_parameters():
        out[name] = {k: v.clone() for k, v in engine.optimizer.state.get(p, {}).items()}
        out[f"w:{name}"] = {"value": p.detach().clone()}
    return out


@pytest.mark.parametrize("kind, mode", [("sgd", "carry"), ("adam", "carry"), ("sgd", "reset")])
def test_a_run_carries_the_state_by_the_rule(kind, mode, tmp_path, synthetic_archive, data_cache, monkeypatch) -> None:
    seen: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    original = RunEngine._grow

    def watched(self: RunEngine, *args: Any) -> None:
        seen["before"] = _named_state(self)
        original(self, *args)
        seen["after"] = _named_state(self)

    monkeypatch.setattr(RunEngine, "_grow", watched)
    xross.train(
        nets=[VGG], mode="independent", cuts=["features.0"], data=str(synthetic_archive), cache_dir=str(data_cache),
        subset=64, eval_subset=16, image_size=8, batch_size=16, epochs=1, dtype="float64", optimizer=kind,
        lr=0.01, momentum=0.9, grow=["0.5:net2wider:features.0.block.conv:new_width=13"], grow_optimizer=mode,
        out=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    before, after = seen["before"], seen["after"]
    old_rows, new_rows = before[f"w:{ROWS[0]}"]["value"], after[f"w:{ROWS[0]}"]["value"]
    index = torch.tensor([next(i for i in range(8) if torch.equal(row, old_rows[i])) for row in new_rows])
    c = torch.bincount(index, minlength=8).double()[index]
    assert index[:8].tolist() == list(range(8)) and len(index) == 13 and c.max() > c.min()
    if mode == "reset":
        assert all(not state for name, state in after.items() if not name.startswith("w:"))
        return
    moments = ["momentum_buffer"] if kind == "sgd" else ["exp_avg", "exp_avg_sq"]
    for name in ROWS:
        shape = (-1,) + (1,) * (before[name][moments[0]].dim() - 1)
        for key in moments:
            power = 2 if key == "exp_avg_sq" else 1
            want = before[name][key][index] / c.view(shape) ** power
            assert close(after[name][key], want), (name, key)
    for key in moments:
        assert torch.equal(after[COLUMNS][key], before[COLUMNS][key][:, index]), key
        for name in ("classifier.weight", "classifier.bias"):  # not widened: as they were
            assert torch.equal(after[name][key], before[name][key]), (name, key)
    if kind == "adam":
        assert all(torch.equal(after[n]["step"], before[n]["step"]) for n in before if not n.startswith("w:"))
