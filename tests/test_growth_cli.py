"""The ``growth`` command line: sites, mutate, random, replay; bad input is one line and exit status 2."""

from __future__ import annotations

import json

import pytest
import torch

import surgery
from growth.graphedit import default_inputs
from surgery.graph.flops import human
from surgery.graph.inputs import Example


def _per_sample(model: torch.nn.Module, example: Example) -> float:
    return surgery.count_flops(model, *example.args, **example.kwargs) / example.args[0].shape[0]


def test_sites_lists_where_an_op_applies(cli) -> None:
    r = cli("growth", "sites", "resnet18", "--op", "net2deeper")
    assert r.code == 0, r
    # 19 identity convs, 1 linear, 5 residual blocks a copy can follow, 19 new residual blocks (4-D values >= 0)
    assert "net2deeper applies at 44 sites" in r.out and "layer1_0_relu" in r.out and "avgpool" in r.out
    assert "│ layer4.1        │ block    │" in r.out and "│ layer4_1_relu_1 │ residual │" in r.out


def test_mutate_prints_the_change_and_saves(cli, tmp_path) -> None:
    out = tmp_path / "wide"
    r = cli(
        "growth",
        "mutate",
        "resnet18",
        "--op",
        "net2wider",
        "--at",
        "layer2.0.conv1",
        "--factor",
        "1.5",
        "--seed",
        "0",
        "--out",
        out,
    )
    assert r.code == 0, r
    assert "params 11.7M -> 11.8M (+111k)" in r.out and "max |Δ output|" in r.out
    guess = default_inputs(surgery.build_model("resnet18"))  # no --input: FLOPs per sample of growth's guess, named
    assert f"FLOPs per sample {human(_per_sample(surgery.build_model('resnet18'), guess))} -> " in r.out
    assert f"FLOPs per sample: forward FLOPs counted on {guess.describe()}" in r.out
    grown = surgery.load(out)
    assert grown.get_submodule("layer2.0.conv1").out_channels == 192
    r = cli("growth", "mutate", out, "--op", "add_skip", "--src", "layer1", "--dst", "layer2", "--out", out)
    assert r.code == 2 and "is not empty" in r.err, r
    r = cli(
        "growth",
        "mutate",
        out,
        "--op",
        "net2deeper",
        "--at",
        "layer1",
        "--kernel-size",
        "1",
        "--no-batchnorm",
        "--activation",
        "none",
        "--input",
        "4,3,32,32",
        "--out",
        out,
        "--force",
    )
    assert r.code == 0, r
    four = Example.parse(["4,3,32,32"])
    assert f"FLOPs per sample {human(_per_sample(grown, four))} -> " in r.out
    assert "counted on float32:4x3x32x32, divided by its batch of 4" in r.out
    assert surgery.load(out).get_submodule("layer1.net2deeper0.0").kernel_size == (1, 1)


def test_random_then_replay_gives_the_same_network(cli, tmp_path) -> None:
    log = tmp_path / "mutations.jsonl"
    r = cli("growth", "random", "resnet18", "--steps", "3", "--seed", "0", "--log", log, "--out", tmp_path / "random")
    assert r.code == 0, r
    assert len(log.read_text().splitlines()) == 3 and "params" in r.out and "max |Δ output|" in r.out
    r = cli("growth", "replay", "resnet18", log, "--out", tmp_path / "a")  # built again, from the logged seed
    assert r.code == 0, r
    a, grown = surgery.load(tmp_path / "a"), surgery.load(tmp_path / "random")
    assert a.state_dict().keys() == grown.state_dict().keys()
    assert all(torch.equal(x, grown.state_dict()[k]) for k, x in a.state_dict().items())
    start = tmp_path / "start"
    surgery.save(surgery.build_model("resnet18"), start)  # other weights: refused, in one line
    r = cli("growth", "replay", start, log)
    assert r.code == 2 and "weights are not those the log was grown from" in r.err and r.err.count("\n") <= 1, r
    r = cli("growth", "replay", "resnet18", log, "--out", tmp_path / "b")
    assert "replay of" in r.out and "max |Δ output|" in r.out
    assert f"FLOPs per sample: forward FLOPs counted on {default_inputs(a).describe()}" in r.out  # as logged
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert surgery.count_params(a) == steps[-1]["params_after"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["mutate", "resnet18", "--op", "net2wider", "--at", "layer2.0.conv", "--factor", "1.5"],
            "closest: layer2.0.conv2, layer2.0.conv1",
        ),
        (
            ["mutate", "resnet18", "--op", "net2wider", "--at", "fc", "--factor", "1.5"],
            "reaches the model output (node 'output'); applicable sites: conv1",
        ),
        (["mutate", "resnet18", "--op", "net2wider", "--at", "conv1", "--factor", "1"], "factor=1.0 does not widen"),
        (
            ["mutate", "resnet18", "--op", "net2wider", "--at", "conv1", "--new-width", "32"],
            "not larger than the 64 channels",
        ),
        (["mutate", "resnet18", "--op", "net2deeper"], "net2deeper needs --at"),
        (
            ["mutate", "resnet18", "--op", "net2deeper", "--at", "layer1", "--factor", "2"],
            "--factor does not apply to net2deeper",
        ),
        (
            ["mutate", "torch.nn:Transformer", "--op", "net2wider", "--at", "x", "--factor", "1.5"],
            "cannot trace Transformer",
        ),
        (["sites", "resnet18", "--op", "wider"], "unknown growth op 'wider'"),
        (["replay", "resnet18", "missing.jsonl"], "cannot read growth log"),
    ],
)
@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
def test_bad_input_exits_2_with_one_line(cli, args: list[str], message: str) -> None:
    r = cli("growth", *args)
    assert r.code == 2, r
    assert message in r.err and r.err.count("\n") <= 2, r.err


def test_corrupt_log_exits_2(cli, tmp_path) -> None:
    log = tmp_path / "bad.jsonl"
    log.write_text('{"op": "net2wider", "site": "conv1", "args": {"factor": 1.5}}\nnot json\n')
    r = cli("growth", "replay", "resnet18", log)
    assert r.code == 2 and "bad.jsonl:2: not valid JSON" in r.err, r


def test_every_command_has_help(cli) -> None:
    for command in ([], ["sites"], ["mutate"], ["random"], ["replay"]):
        r = cli("growth", *command, "--help")
        assert r.code == 0 and "Usage" in r.out, (command, r)
