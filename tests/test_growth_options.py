"""How a growth during training is done: --grow-warmup re-warms the rate, --grow-kd distils from the net as it was,
--grow-init random starts the new units afresh and keeps what stays in place.

The schedule, the function at the growth point, the optimiser carry and resumption are in
tests/test_growth_training.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import growth
import xross
from xross.cohort.grow import grow_model
from xross.data.synthetic import write_synthetic
from xross.run.growing import read_log
from xross.run.metrics import read_metrics

VGG = "growth.models:small_vgg(widths=[8,16])"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("growth-options") / "data", train_per_class=4, test_per_class=1)


def _train(data: Path, out: Path, **options: object) -> Path:
    config = dict(
        nets=[VGG],
        cuts=["features.0"],
        mode="independent",
        data=str(data),
        batch_size=8,
        epochs=2,
        eval_every=0,
        log_every=1,
        optimizer="sgd",
        lr=0.1,
        lr_schedule="constant",
        cache_dir=str(out.parent / "cache"),
        out=str(out),
        dtype="float64",
    )
    xross.train(progress=False, **{**config, **options})  # type: ignore[arg-type]
    return out


def test_grow_warmup_rewarms_the_rate_linearly_after_each_growth(data: Path, tmp_path: Path) -> None:
    run = _train(data, tmp_path / "run", grow=["step=3:net2wider:all:factor=2"], grow_warmup=4)
    rates = {int(r["global_step"]): r["lr"] for r in read_metrics(run, "steps")}  # row k: the rate of step k-1
    assert [rates[k] for k in (1, 2, 3)] == [0.1, 0.1, 0.1]
    assert [rates[k] for k in (4, 5, 6, 7)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert rates[8] == 0.1


def test_grow_kd_blends_a_grown_nets_loss_with_its_kl_to_itself_before_the_growth(data: Path, tmp_path: Path) -> None:
    run = _train(data, tmp_path / "run", grow=["step=3:net2deeper:stages"], grow_kd="2:0.25:3")
    rows = {int(r["global_step"]): r for r in read_metrics(run, "steps")}
    with_kd = sorted(k for k, r in rows.items() if "grow_kd0" in r)
    assert with_kd == [4, 5, 6]  # the three steps after the growth (rows are numbered after their step)
    for k in with_kd:
        r = rows[k]
        assert r["loss0"] == pytest.approx(0.75 * r["ce0"] + 0.25 * r["grow_kd0"], rel=1e-5)
        assert r["grow_kd0"] >= 0
    for k in set(rows) - set(with_kd):
        assert rows[k]["loss0"] == pytest.approx(rows[k]["ce0"], rel=1e-5)


def test_grow_init_random_keeps_what_stays_in_place_and_draws_the_rest() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    steps = growth.expand(net, "net2wider", "0", new_width=7, example_input=x)
    copied, origins = grow_model(net, steps, x, carry=True)
    fresh, kept = grow_model(net, steps, x, carry=True, init="random", seed=1)
    w0, w2 = fresh.get_submodule("0").weight, fresh.get_submodule("2").weight
    assert torch.equal(w0[:4], net[0].weight) and torch.equal(w2[:, :4], net[2].weight)  # undivided
    assert not torch.allclose(w0[4:], copied.get_submodule("0").weight[4:])  # not copies
    assert not torch.allclose(fresh(x), net(x))  # the function is not kept
    again, _ = grow_model(net, steps, x, init="random", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), fresh.parameters()))  # seeded
    first = kept[w0]  # only the elements in place keep an origin, with gradient scale 1
    assert (first.index[:4] >= 0).all() and (first.index[4:] == -1).all()
    assert torch.equal(first.scale[:4], torch.ones(4, 3, dtype=torch.float64))


def test_grow_init_random_in_a_run_moves_the_function_and_says_by_how_much(data: Path, tmp_path: Path) -> None:
    run = _train(data, tmp_path / "run", grow=["step=3:net2wider:all:factor=2"], grow_init="random")
    (entry,) = read_log(run)
    assert entry.init == "random" and entry.max_logit_change > 1e-3
    assert entry.loss_before[0] != entry.loss_after[0]
