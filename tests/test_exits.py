"""xross.cohort.exits: heads after every part leave the paths as they were, learn with their nets, and save, load,
resume and attach (``xross add-exits``) bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, final_state, finish, interrupt_after_steps, tiny, xross
from torch.nn import functional as F

from xross.cohort.exits import PoolLinear, exit_loss, exit_prefixes, head_factory
from xross.cohort.grid import Cohort
from xross.errors import XrossError
from xross.run.config import TrainConfig
from xross.run.directory import load_run

VIT = "timm:vit_tiny_patch16_224(img_size=32, patch_size=8, depth=3, embed_dim={}, num_heads=3)"


def three_parts(exits: bool) -> Cohort:
    torch.manual_seed(0)
    return Cohort.build(
        [tiny([8, 16]), tiny([12, 16])], cuts=["features.0", "features.1"], num_classes=10, image_size=16, exits=exits
    )


def conv_head(channels: int, num_classes: int) -> torch.nn.Module:
    """A head of the user's own: a 1x1 conv to the classes, then a global average."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, num_classes, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )


def test_exit_heads_leave_the_nets_and_their_paths_as_they_were() -> None:
    plain, with_exits = three_parts(False), three_parts(True)
    state = with_exits.state_dict()
    heads = {k for k in state if k.startswith("exits.")}
    assert len(with_exits.exits.heads) == 2 * 2 and heads  # K nets x (P - 1) boundaries
    assert_same_tensors(plain.state_dict(), {k: v for k, v in state.items() if k not in heads})
    x = torch.randn(3, 3, 16, 16)
    plain.eval(), with_exits.eval()
    a, b = plain.forward_paths(x, plain.paths()), with_exits.forward_paths(x, with_exits.paths(), prefixes={})
    assert all(torch.equal(a[p], b[p]) for p in plain.paths())


def test_exit_loss_is_each_prefix_cross_entropy_charged_to_the_net_it_ends_in() -> None:
    cohort = three_parts(True)
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    values: dict = {}
    cohort.forward_paths(x, cohort.paths(), prefixes=values)
    prefixes = exit_prefixes(cohort.paths(), cohort.num_parts)
    assert set(prefixes) == {(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)}
    terms = exit_loss(cohort.exits, values, prefixes, labels, weights=[0.5, 2.0])
    by_hand = {
        net: sum(
            w * F.cross_entropy(cohort.exits.head(net, len(q) - 1)(values[q]), labels)
            for q, w in (((net,), 0.5), ((0, net), 2.0), ((1, net), 2.0))
        )
        for net in (0, 1)
    }
    for net in (0, 1):
        torch.testing.assert_close(terms[net], by_hand[net], rtol=1e-6, atol=0)


def test_token_features_get_a_token_mean_head_and_user_heads_need_trust() -> None:
    torch.manual_seed(0)
    vits = Cohort.build([VIT.format(96), VIT.format(144)], cuts=["blocks.0", "blocks.1"], num_classes=10, exits=True)
    head = vits.exits.head(1, 1)
    assert isinstance(head, PoolLinear) and head.fc.in_features == 144
    values: dict = {}
    vits.eval().forward_paths(torch.randn(2, 3, 32, 32), [(0, 1, 1)], prefixes=values)
    assert vits.exits.logits((0, 1), values[(0, 1)]).shape == (2, 10)
    with pytest.raises(XrossError, match="the exit head 'test_exits:conv_head'.*--trust-code"):
        head_factory("test_exits:conv_head")
    own = Cohort.build(
        [tiny([8, 16]), tiny([12, 16])], cuts=["features.0"], num_classes=10, image_size=16, exits=True,
        exit_head="test_exits:conv_head", trust_code=True,
    )  # fmt: skip
    assert own.exits.logits((1,), torch.randn(2, 12, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"exit_weights": [1.0]}, "applies with --exits only"),
        ({"exits": True, "exit_weights": [1.0, 1.0]}, "one weight per cut"),
        ({"exits": True, "frozen_cohort": True}, "give --init-from"),
        ({"mode": "mutualnet", "nets": ["resnet18"], "exits": True}, "no parts to exit from"),
    ],
)
def test_config_errors_name_the_option(options: dict, message: str) -> None:
    with pytest.raises(XrossError, match=message):
        TrainConfig.from_dict({"nets": ["resnet18", "mobilenet_v2"], **options})


def exit_args(archive: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--nets", "resnet18,mobilenet_v2", "--cut", "layer1,features.3", "--cut", "layer3,features.10",
        "--data", str(archive), "--subset", "80", "--eval-subset", "40", "--batch-size", "16", "--epochs", "2",
        "--lr", "1e-3", "--cache-dir", str(cache), "--threads", "1", "--log-every", "1", "--eval-every", "0",
        "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_a_run_with_exits_resumes_bit_identically_and_reports_every_exit(tmp_path, cifar10_archive, data_cache) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    extra = ("--mode", "xml", "--exits", "--exit-weights", "1,0.5")
    code, out, err = finish(xross(*exit_args(cifar10_archive, data_cache, straight, *extra)))
    assert code == 0, err
    assert "exits (the head after the parts run so far)" in out
    code, _, err = interrupt_after_steps(
        xross(*exit_args(cifar10_archive, data_cache, interrupted, *extra)), interrupted
    )
    assert code == 130, err
    code, _, err = finish(xross("train", "--resume", "--out", str(interrupted), "--no-progress"))
    assert code == 0, err
    a, b = final_state(straight), final_state(interrupted)
    assert a["position"] == b["position"]
    assert any(k.startswith("exits.heads.n1_b1.") for k in a["cohort"])
    assert_same_tensors(a["cohort"], b["cohort"])
    result = json.loads((straight / "eval.json").read_text())
    assert {tuple(e["prefix"]) for e in result["exits"]} == {(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)}
    _, cohort = load_run(straight)  # the heads load with the run
    assert_same_tensors(cohort.state_dict(), a["cohort"])
    assert cfg_holdout(straight) == 10  # a tenth of the 80 training images, but at least one per class


def cfg_holdout(run: Path) -> int:
    return TrainConfig.load(run / "config.yaml").holdout  # type: ignore[return-value]


@pytest.mark.slow
def test_add_exits_trains_heads_on_a_frozen_cohort(tmp_path, cifar10_archive, data_cache) -> None:
    base, heads = tmp_path / "base", tmp_path / "heads"
    code, _, err = finish(xross(*exit_args(cifar10_archive, data_cache, base, "--mode", "independent")))
    assert code == 0, err
    code, out, err = finish(xross("add-exits", str(base), "--out", str(heads), "--epochs", "1", "--no-progress"))
    assert code == 0, err
    before, after = final_state(base)["cohort"], final_state(heads)["cohort"]
    assert_same_tensors(before, {k: v for k, v in after.items() if not k.startswith("exits.")})  # BN buffers too
    assert any(k.startswith("exits.") for k in after)
    code, _, err = finish(xross("add-exits", str(heads), "--out", str(tmp_path / "again")))
    assert code == 2 and "already has exit heads" in err and len(err.strip().splitlines()) == 1
    code, _, err = finish(xross("anytime", str(base)))
    assert code == 2 and "retrain with --exits or run `xross add-exits" in err and len(err.strip().splitlines()) == 1


def test_epochs_csv_has_every_exits_accuracy_per_evaluated_epoch(tmp_path, data_cache) -> None:
    """One net in three parts with exits, evaluated every second epoch: epochs.csv gains a column per exit
    (the first, unevaluated epoch's cells empty), equal to the final evaluation of the same weights."""
    from xross.data.synthetic import write_synthetic
    from xross.methods.trainer import train
    from xross.run.metrics import read_metrics

    data = write_synthetic(tmp_path / "data", train_per_class=8, test_per_class=2, classes=("a", "b", "c"))
    result = train(
        nets=["growth.models:small_vgg(widths=[8, 16], image_size=32)"], cuts=["features.0", "features.1"],
        mode="independent", exits=True, data=str(data),
        batch_size=8, epochs=2, eval_every=2, cache_dir=str(data_cache), out=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    header = (tmp_path / "run" / "epochs.csv").read_text().splitlines()[0].split(",")
    assert header == [
        "epoch",
        "global_step",
        "train_flops",
        "top1_net0",
        "top1_ensemble",
        "top1_exit_0",
        "top1_exit_0-0",
    ]
    first, second = read_metrics(tmp_path / "run", "epochs")
    assert set(first) == {"epoch", "global_step", "train_flops"}  # not evaluated: empty cells
    final = {f"top1_exit_{'-'.join(map(str, e.prefix))}": e.top1 for e in result.exits}
    assert final.keys() == {"top1_exit_0", "top1_exit_0-0"}
    assert {k: second[k] for k in final} == {k: float(f"{v:.6g}") for k, v in final.items()}
