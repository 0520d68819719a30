"""growth.mutation: random feasible growth; 20 steps keep the function, the grown net trains, the log replays.

The log replays bit for bit; unreadable logs name the line.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import growth
import surgery
from growth.check import vary_constant_weights
from growth.errors import GrowthError

STEPS = 20


@pytest.fixture(scope="module")
def grown_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[nn.Module, nn.Module, list[growth.MutationRecord], Path]:
    torch.manual_seed(0)
    start = vary_constant_weights(
        surgery.build_model("resnet18", num_classes=10).eval(), torch.Generator().manual_seed(0)
    )
    log = tmp_path_factory.mktemp("growth") / "mutations.jsonl"
    grown, records = growth.mutate(start, steps=STEPS, seed=0, log=log)
    return start, grown, records, log


def test_twenty_random_steps_keep_the_function(grown_run) -> None:
    start, grown, records, _ = grown_run
    assert len(records) == STEPS
    assert len({r.op for r in records}) >= 4, "random growth should mix the ops"
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        y = start.eval()(x)
        assert (grown.eval()(x) - y).abs().max() <= 1e-4 * y.abs().max()
    for before, after in zip(records, records[1:]):
        assert after.params_before == before.params_after and after.flops_before == before.flops_after
    assert records[-1].params_after > records[0].params_before
    assert all(r.max_abs_change <= 1e-4 * y.abs().max() for r in records)


def test_the_grown_net_trains(grown_run) -> None:
    _, grown, _, _ = grown_run
    net = copy.deepcopy(grown).train()
    torch.manual_seed(1)
    x, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_log_replays_exactly(grown_run) -> None:
    start, grown, records, log = grown_run
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(d["step"], d["op"], d["site"]) for d in lines] == [(r.step, r.op, r.site) for r in records]
    assert {"params_before", "params_after", "flops_before", "flops_after", "max_abs_change", "args"} <= set(lines[0])
    again, replayed = growth.replay(start, log)
    assert [r.site for r in replayed] == [r.site for r in records]
    state, expected = again.state_dict(), grown.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert lines[0]["weights_before"] == growth.weights_digest(start)  # what the log was grown from
    after = [r.weights_after for r in records]
    assert [r.weights_after for r in replayed] == [d["weights_after"] for d in lines] == after


def test_a_replay_on_other_weights_is_refused(grown_run) -> None:
    start, _, _, log = grown_run
    other = copy.deepcopy(start)
    with torch.no_grad():
        other.fc.bias[0] += 1e-3
    with pytest.raises(GrowthError, match=r"^the model's weights are not those the log was grown from \(SHA-256 "):
        growth.replay(other, log)


def test_the_grown_net_saves_and_loads(grown_run, tmp_path) -> None:
    _, grown, _, _ = grown_run
    surgery.save(grown, tmp_path / "grown")
    again = surgery.load(tmp_path / "grown").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), grown.eval()(x))


def test_random_mutation_follows_the_rng_and_the_probabilities() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    a, rec_a = growth.random_mutation(
        net,
        random.Random(5),
        probs={"net2wider": 1.0, "net2deeper": 0.0, "net2branch": 0.0, "widen_kernel": 0.0, "add_skip": 0.0},
    )
    b, rec_b = growth.random_mutation(net, random.Random(5), ops=["net2wider"])
    assert rec_a.op == rec_b.op == "net2wider" and rec_a.site == rec_b.site and rec_a.args == rec_b.args
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    _, rec = growth.random_mutation(net, random.Random(0), ops=["widen_kernel"])
    assert rec.op == "widen_kernel" and rec.args == {"kernel_size": [5, 5]}
    with pytest.raises(GrowthError, match="no growth op among add_skip applies"):
        growth.random_mutation(nn.Sequential(nn.Linear(4, 4)), random.Random(0), ops=["add_skip"])
    with pytest.raises(GrowthError, match="unknown growth op 'deeper'"):
        growth.random_mutation(net, random.Random(0), ops=["deeper"])
    with pytest.raises(GrowthError, match="at least one > 0"):
        growth.random_mutation(net, random.Random(0), probs={op: 0.0 for op in growth.OPS})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"op": "net2wider", "site": "conv1"\n', r"mutations.jsonl:1: not valid JSON"),
        (
            '{"op": "net2wider", "site": "conv1", "args": {"factor": 1.5}}\n[1, 2]\n',
            r"mutations.jsonl:2: expected an object of fields at the top level, found a list of 2",
        ),
        ('\n{"op": "grow", "site": "conv1", "args": {}}\n', r"mutations.jsonl:2: unknown op 'grow'"),
        ('{"op": "net2wider", "args": {}}\n', r"mutations.jsonl:1: field 'site' is missing"),
        (
            '{"op": "net2wider", "site": "conv1", "args": {}, "colour": 1}\n',
            r"mutations.jsonl:1: field 'colour' is not a known field",
        ),
        (b"\xff\xfe\x00", r"cannot read growth log"),
    ],
)
def test_unreadable_logs_name_the_line(tmp_path: Path, content: str | bytes, message: str) -> None:
    log = tmp_path / "mutations.jsonl"
    log.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(GrowthError, match=message):
        growth.read_log(log)
    with pytest.raises(GrowthError, match="cannot read growth log .*No such file"):
        growth.read_log(tmp_path / "missing.jsonl")
