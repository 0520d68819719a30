"""Growth during training (issue 27): a ``--grow`` schedule keeps the function at the growth point, an xml
cohort's adapters follow a grown boundary, a stop right after a growth resumes bit for bit, ``xross eval`` and
``export`` see the grown nets, a growth that cannot apply is one line before training, and torchrun matches
one process across a growth. The optimiser carry against its written-out rule: tests/test_growth_carry.py.

Small nets (small_vgg at widths 8/16 on 8x8 images, a width-4 CIFAR ResNet-18 of torchvision's BasicBlocks),
64 synthetic images in 4 steps of 16, float64 wherever numbers are compared.
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from helpers import assert_same_tensors, final_state

import growth
import surgery
import xross
from surgery.pieces.adapters import Adapter
from xross.cohort.grid import Cohort
from xross.cohort.grow import grow_net
from xross.errors import Interrupted
from xross.run.engine import RunEngine
from xross.run.evaluate import EvalResult
from xross.run.growing import read_log

VGG = "growth.models:small_vgg(widths=[8, 16], image_size=8)"
WIDE = "growth.models:small_vgg(widths=[16, 32], image_size=8)"
RESNET18 = "growth.models:resnet(layers=[2, 2, 2, 2], width=4)"  # ResNet-18's layout at width 4
BATCH, STEPS, SIZE = 16, 4, 8  # 64 images of 8x8 pixels: 4 steps an epoch


@pytest.fixture
def options(tmp_path: Path, synthetic_archive: Path, data_cache: Path) -> dict[str, Any]:
    """A small float64 xml run of two small VGGs cut after their first stage, logging every step."""
    return dict(
        nets=[VGG, VGG], cuts=["features.0"], mode="xml", data=str(synthetic_archive), cache_dir=str(data_cache),
        subset=BATCH * STEPS, eval_subset=16, image_size=SIZE, batch_size=BATCH, epochs=1, dtype="float64",
        optimizer="sgd", lr=0.05, log_every=1, eval_every=1, out=str(tmp_path / "run"),
    )  # fmt: skip


def steps_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_state(a: Any, b: Any, where: str = "") -> None:
    """Two nested checkpoint values (dicts, lists, tensors, numbers) are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{k}]")
    else:
        assert a == b, where


# --- 1. the function at the growth point -----------------------------------------------------------

CONVS = ["features.0.block.conv", "features.1.block.conv"]
CASES = {  # mode, nets, the schedule, the sites each net grows at (None: drawn at random)
    "net2wider-all-xml": ("xml", [VGG, VGG], "0.5:net2wider:all:factor=2", ["+".join(CONVS)]),
    "net2deeper-blocks-resnet18": (
        "independent",
        [RESNET18],
        "0.5:net2deeper:stages",
        [f"layer{i}.1" for i in (1, 2, 3, 4)],
    ),
    "net2deeper-identity-vgg": (
        "independent",
        [VGG],
        "0.5:net2deeper:stages",
        [f"features.{i}.block.relu" for i in (0, 1)],
    ),
    "net2branch-all-dml": ("dml", [VGG, VGG], "0.5:net2branch:all", [*CONVS, "classifier"]),
    "random-2": ("independent", [VGG], "0.5:any:random:2", None),
}


@pytest.mark.parametrize("mode, nets, schedule, sites", CASES.values(), ids=CASES.keys())
def test_a_growth_keeps_the_function_and_counts_its_flops(options, mode, nets, schedule, sites) -> None:
    cuts = {"cuts": ["layer2"]} if nets == [RESNET18] else {}
    xross.train(progress=False, **{**options, **cuts, "mode": mode, "nets": nets, "grow": [schedule]})
    run = Path(options["out"])
    (entry,) = read_log(run)
    assert entry.item == schedule and entry.global_step == STEPS // 2
    assert sorted(entry.nets) == list(range(len(nets)))  # every net grew
    op = schedule.split(":")[1]
    for steps in entry.nets.values():
        assert [s["site"] for s in steps] == sites if sites else len(steps) == 2
        assert all(s["op"] == op for s in steps) if op != "any" else all(s["op"] in growth.OPS for s in steps)
    assert entry.max_logit_change <= 1e-5, entry.max_logit_change
    assert entry.loss_before.keys() == entry.loss_after.keys() == set(range(len(nets)))
    for i in entry.loss_before:
        assert abs(entry.loss_before[i] - entry.loss_after[i]) <= 1e-9, (i, entry.loss_before, entry.loss_after)
    assert entry.params_after > entry.params_before and entry.flops_after > entry.flops_before
    assert entry.optimizer == "carry" and entry.init == "copy"

    rows = steps_rows(run)
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4]
    grew = rows[STEPS // 2]  # the row of the first step after the growth
    assert float(grew["grow_logit_change"]) <= 1e-5
    assert all(r["grow_logit_change"] == "" for k, r in enumerate(rows) if k != STEPS // 2)
    for i in entry.loss_before:
        assert grew[f"grow_loss_before{i}"] == grew[f"grow_loss_after{i}"]
        assert float(grew[f"grow_loss_before{i}"]) == pytest.approx(entry.loss_before[i], rel=1e-5)
    # cumulative training FLOPs: 3x the forward FLOPs of what trains per image (no teacher), more after the growth
    flops = [0] + [int(r["train_flops"]) for r in rows]
    spent = [b - a for a, b in zip(flops, flops[1:])]
    assert spent == [3 * entry.flops_before * BATCH] * 2 + [3 * entry.flops_after * BATCH] * 2, spent
    epochs = list(csv.DictReader(open(run / "epochs.csv", newline="")))
    assert int(epochs[-1]["train_flops"]) == flops[-1]


# --- 4. an xml cohort's adapters follow a grown boundary -------------------------------------------


def _cohort(nets: list[str], **kw: Any) -> Cohort:
    torch.manual_seed(0)
    return Cohort.build(nets, ["features.0"], num_classes=10, image_size=SIZE, **kw).double().eval()


def _randomised(cohort: Cohort) -> Cohort:
    """Every BatchNorm's statistics and affine varied (the nets' and the adapters'), so that a grown layer that
    reads them wrong shows in eval mode."""
    with torch.no_grad():
        for module in cohort.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return cohort


def _whole(cohort: Cohort, net: int) -> torch.nn.Module:
    whole = cohort.wholes[net]
    assert whole is not None
    return whole


def _adapter(cohort: Cohort, key: str) -> Adapter:
    adapter = cohort.adapters[key]
    assert isinstance(adapter, Adapter)
    return adapter


def _assert_paths_kept(before: dict, cohort: Cohort, x: torch.Tensor) -> None:
    with torch.no_grad():
        after = cohort.eval().forward_paths(x, cohort.paths())
    assert after.keys() == before.keys() == set(cohort.paths())
    for path in before:
        change = float((after[path] - before[path]).abs().max())
        assert change <= 1e-9 * float(before[path].abs().max()), (path, change)


def test_xml_cohort_of_two_widths_grows_net0_with_its_adapters() -> None:
    cohort = _randomised(_cohort([VGG, WIDE], adapter_batchnorm=True))  # 8 vs 16 channels: adapters both ways
    assert sorted(cohort.adapters) == ["b0_0to1", "b0_1to0"]
    x = torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        before = cohort.forward_paths(x, cohort.paths())
    steps = growth.expand(
        _whole(cohort, 0), "net2wider", "features.0.block.conv", new_width=13, seed=3, example_input=x
    )
    grow_net(cohort, 0, steps, image_size=SIZE, example=x)
    _assert_paths_kept(before, cohort, x)
    reader, writer = _adapter(cohort, "b0_0to1"), _adapter(cohort, "b0_1to0")  # from net 0 / into net 0
    assert isinstance(reader.map, torch.nn.Conv2d) and isinstance(writer.map, torch.nn.Conv2d)
    assert reader.map.weight.shape == (16, 13, 1, 1) and reader.map.in_channels == 13 and reader.in_shape == (13, 4, 4)
    assert (
        writer.map.weight.shape == (13, 16, 1, 1) and writer.map.out_channels == 13 and writer.out_shape == (13, 4, 4)
    )
    assert isinstance(writer.norm, torch.nn.BatchNorm2d) and writer.norm.num_features == 13
    assert [tuple(t.shape) for t in writer.norm.state_dict().values() if t.dim()] == [(13,)] * 4  # affine, stats
    assert cast(surgery.Pieces, cohort.nets[0])[0](x).shape == (4, 13, 4, 4)  # net 0's piece, re-cut at the same cut


def test_cohort_of_two_equal_nets_gets_new_adapters_when_one_grows() -> None:
    cohort = _randomised(_cohort([VGG, VGG]))
    assert len(cohort.adapters) == 0  # same shapes: no adapter needed
    x = torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        before = cohort.forward_paths(x, cohort.paths())
    steps = growth.expand(_whole(cohort, 0), "net2wider", "all", factor=2, seed=1, example_input=x)
    grow_net(cohort, 0, steps, image_size=SIZE, example=x)
    _assert_paths_kept(before, cohort, x)
    assert sorted(cohort.adapters) == ["b0_0to1", "b0_1to0"]
    down, up = _adapter(cohort, "b0_0to1").map.weight, _adapter(cohort, "b0_1to0").map.weight
    assert down.shape[:2] == (8, 16) and up.shape[:2] == (16, 8)  # net 0's 16 copies averaged to 8; 8 repeated


# --- 3, 5. a stop right after a growth resumes bit for bit; eval and export see the grown nets --------


def _stop_after_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run gets SIGINT right after its growth (it ends the step on that batch and saves)."""
    original = RunEngine._grow

    def grow_then_stop(self: RunEngine, *args: Any) -> None:
        original(self, *args)
        self.stop_signal = signal.SIGINT

    monkeypatch.setattr(RunEngine, "_grow", grow_then_stop)


def _stop_at_epoch_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run gets SIGINT during the last step of its first epoch (it saves at that epoch's end)."""
    original = RunEngine._log_step

    def log_then_stop(self: RunEngine, *args: Any) -> None:
        original(self, *args)
        if self.position.epoch == 0 and self.position.step == len(self.train_loader):
            self.stop_signal = signal.SIGINT

    monkeypatch.setattr(RunEngine, "_log_step", log_then_stop)


def _straight_and_resumed(
    run: Any, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, stop: Any
) -> tuple[Path, Path, dict[str, Any]]:
    """One run straight, the same interrupted by ``stop`` and resumed: the two run dirs and the stop's checkpoint."""
    straight, resumed = Path(options["out"]).with_name("straight"), Path(options["out"]).with_name("resumed")
    run(progress=False, **{**options, "out": str(straight)})
    with monkeypatch.context() as patch:
        stop(patch)
        with pytest.raises(Interrupted, match="--resume"):
            run(progress=False, **{**options, "out": str(resumed)})
    stopped = final_state(resumed)
    run(resume=True, progress=False, out=str(resumed))
    return straight, resumed, stopped


def assert_runs_identical(a: Path, b: Path, part: str = "cohort") -> None:
    """Two run dirs end alike: the last checkpoint's weights and optimiser state, and every record, byte for byte."""
    one, two = final_state(a), final_state(b)
    assert one["position"] == two["position"]
    assert_same_tensors(one[part], two[part])
    assert_same_state(one["optimizer"], two["optimizer"], "optimizer")
    assert one["growth"] == two["growth"]
    for name in ("steps.csv", "epochs.csv", "eval.json", "growth.jsonl"):
        assert (a / name).read_text() == (b / name).read_text(), name


def test_xml_of_two_widths_stopped_right_after_growing_net0_resumes_bit_identical(options, monkeypatch) -> None:
    options.update(nets=[VGG, WIDE], grow=["0.25:net2wider:all:factor=2,net=0"], momentum=0.9)
    straight, resumed, stopped = _straight_and_resumed(xross.train, options, monkeypatch, _stop_after_growth)
    assert stopped["position"]["global_step"] == 2 and len(stopped["growth"]) == 1  # grew before step 2
    assert stopped["cohort"]["adapters.b0_0to1.map.weight"].shape[1] == 16  # net 0's 8 channels doubled
    assert_runs_identical(straight, resumed)
    (entry,) = read_log(straight)
    assert list(entry.nets) == [0] and entry.max_logit_change <= 1e-5


def test_a_stop_at_the_epoch_end_before_an_epoch_growth_resumes_bit_identical(options, monkeypatch) -> None:
    options.update(mode="independent", nets=[VGG], subset=2 * BATCH, epochs=2, grow=["epoch=1:net2wider:all:factor=2"])
    options.update(optimizer="adam", lr=1e-3)
    straight, resumed, stopped = _straight_and_resumed(xross.train, options, monkeypatch, _stop_at_epoch_end)
    assert stopped["position"] == {**stopped["position"], "epoch": 0, "step": 2, "global_step": 2}
    assert stopped["growth"] == []  # the growth comes after the resume
    assert_runs_identical(straight, resumed)
    (entry,) = read_log(resumed)
    assert entry.global_step == 2 and entry.max_logit_change <= 1e-5


def test_dml_grows_resumes_and_eval_export_see_the_grown_nets(options, monkeypatch, cli, tmp_path) -> None:
    options.update(mode="dml", grow=["0.25:net2deeper:stages", "0.5:net2wider:all:factor=2"])
    options.update(optimizer="adam", lr=1e-3)
    straight, resumed, stopped = _straight_and_resumed(xross.train, options, monkeypatch, _stop_after_growth)
    assert stopped["position"]["global_step"] == 2 and len(stopped["growth"]) == 1  # the second growth comes next
    assert_runs_identical(straight, resumed)
    first, second = read_log(resumed)
    assert (first.global_step, second.global_step) == (1, 2)
    assert first.params_after == second.params_before < second.params_after

    recorded = (resumed / "eval.json").read_text()
    r = cli("xross", "eval", resumed)
    assert r.code == 0, r
    assert (resumed / "eval.json").read_text() == recorded  # what `xross eval` recomputes from the grown nets
    assert EvalResult.load(resumed / "eval.json").samples == 16
    exported = 0
    for i in (0, 1):
        r = cli("xross", "export", resumed, "--path", f"{i},{i}", "--out", tmp_path / f"net{i}")
        assert r.code == 0, r
        net = surgery.load(tmp_path / f"net{i}").double().eval()
        exported += sum(p.numel() for p in net.parameters())
        assert net(torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)).shape == (2, 10)
    adapters = sum(v.numel() for k, v in final_state(resumed)["cohort"].items() if k.startswith("adapters."))
    assert exported + adapters == second.params_after  # the grown nets (and adapters the first growth made)


# --- 7. distillation's student ---------------------------------------------------------------------


def test_distillation_student_grows_and_resumes_bit_identical(options, monkeypatch, tmp_path) -> None:
    teacher = tmp_path / "teacher"  # a saved model (random weights) is a teacher as a trained run is
    surgery.save(surgery.build_model("growth.models:small_vgg", widths=[16, 16], image_size=SIZE), teacher)
    keep = ("data", "cache_dir", "subset", "eval_subset", "image_size", "batch_size", "dtype", "lr", "log_every")
    student = {k: options[k] for k in keep} | dict(
        student=VGG, teacher=[str(teacher)], epochs=1, grow=["0.25:net2wider:all:factor=2"], discriminator="off",
        out=str(tmp_path / "run"),
    )  # fmt: skip
    straight, resumed, stopped = _straight_and_resumed(xross.distill, student, monkeypatch, _stop_after_growth)
    assert stopped["position"]["global_step"] == 2 and len(stopped["growth"]) == 1
    assert_runs_identical(straight, resumed, part="student")
    (entry,) = read_log(straight)
    assert list(entry.nets) == [0] and entry.max_logit_change <= 1e-5
    assert abs(entry.loss_before[0] - entry.loss_after[0]) <= 1e-9
    assert stopped["student"]["features.0.block.conv.weight"].shape[0] == 16  # 8 channels doubled


# --- 6. a growth that cannot apply: one line before training, exit 2 --------------------------------

REFUSED = {
    "no-site": (["--grow", "0.5:net2wider:nosuch.layer:factor=2"], "'nosuch.layer' is not a module path"),
    "factor-1": (["--grow", "0.5:net2wider:all:factor=1"], "factor=1 does not widen"),
    "factor-40": (["--grow", "0.5:net2wider:all:factor=40"], "factor=40 is more than one step grows"),
    "syntax": (["--grow", "0.5:net2wider"], "is WHEN:OP:SITES[:ARG=VALUE,...]"),
    "reset-alone": (["--grow-optimizer", "reset"], "grow_optimizer applies with --grow only"),
    "outside": (["--grow", "step=100000:net2wider:all:factor=2"], "outside the run's 4 steps"),
    "mutualnet": (
        ["--mode", "mutualnet", "--widths", "0.5:1.0", "--grow", "0.5:net2wider:all"],
        "mutualnet trains fractions",
    ),
}


@pytest.mark.parametrize("extra, message", REFUSED.values(), ids=REFUSED.keys())
def test_a_growth_that_cannot_apply_is_one_line_before_training(
    cli, tmp_path, synthetic_archive, data_cache, extra, message
) -> None:
    run = tmp_path / "bad"
    nets = VGG if "mutualnet" in extra else f"{VGG},{VGG}"
    args = ["train", "--nets", nets, "--data", synthetic_archive, "--cache-dir", data_cache, "--subset", "64"]
    args += ["--batch-size", "16", "--image-size", str(SIZE), "--epochs", "1", "--out", run, "--no-progress"]
    args += [] if "mutualnet" in extra else ["--cut", "features.0", "--mode", "xml"]
    r = cli("xross", *args, *extra)
    assert r.code == 2, r
    assert message in r.err and "Traceback" not in r.err, r
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert not run.exists()  # refused before training: no run directory left behind


# --- 8. torchrun: two processes match one across a growth ------------------------------------------


TORCHRUN = {
    "net2wider": ["0.5:net2wider:all:factor=2"],
    "net2wider-then-net2deeper": ["0.5:net2wider:all:factor=2", "0.75:net2deeper:stages"],  # new BatchNorms
}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", TORCHRUN.values(), ids=TORCHRUN.keys())
def test_torchrun_two_processes_match_one_across_a_growth(tmp_path, synthetic_archive, data_cache, schedule) -> None:
    from helpers import finish
    from helpers import xross as run_xross
    from test_distributed import torchrun

    common = ["train", "--nets", f"{VGG},{VGG}", "--cut", "features.0", "--mode", "dml"]
    common += ["--data", str(synthetic_archive), "--cache-dir", str(data_cache), "--subset", "128"]
    common += ["--batch-size", "32", "--image-size", str(SIZE), "--epochs", "1", "--eval-subset", "32"]
    common += ["--dtype", "float64", "--optimizer", "sgd", "--lr", "0.05", "--no-progress"]
    common += [arg for item in schedule for arg in ("--grow", item)]  # sync BN: on by default under torchrun
    code, _, err = finish(run_xross(*common, "--out", str(tmp_path / "one")))
    assert code == 0, err
    torchrun(*common, "--out", str(tmp_path / "two"))
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert one["position"] == two["position"] and one["position"]["global_step"] == 4
    assert one["cohort"].keys() == two["cohort"].keys()
    assert one["cohort"]["nets.0.pieces.0.features.0.block.conv.weight"].shape[0] == 16  # grew: 8 channels doubled
    worst = max((one["cohort"][k] - two["cohort"][k]).abs().max().item() for k in one["cohort"])
    assert worst <= 1e-9, worst
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [e.nets for e in log_one] == [e.nets for e in log_two] and len(log_two) == len(schedule)
    assert all(e.max_logit_change <= 1e-5 for e in log_two)
