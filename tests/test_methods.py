"""xross.run.table: one table of methods and run kinds; every option is used by a method or refused for it.

Every field of TrainConfig and DistillConfig, set to a valid value other than its default, is
either accepted (and, for an objective's options, reaches the objective) or refused in one line
naming the option and the methods that use it, for every method of the table; ModeName and the
table agree; a toy method registered here trains, resumes, evaluates and exports through
``xross.train`` and the command line with no edit outside its registration.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch

import surgery
import xross
from xross.errors import XrossError
from xross.methods.objectives import LossTerms, Mode
from xross.methods.trainer import Trainer
from xross.run.config import CONFIGS, DistillConfig, ModeName, RunConfig, TrainConfig, load_config
from xross.run.directory import load_run
from xross.run.table import METHODS, Method, applies, command_methods, declaration, objective_options, register_method

# a valid value other than the default for every field, and the options it needs beside it when it applies
SAMPLES: dict[str, tuple[typing.Any, dict[str, typing.Any]]] = {
    "stem": ("cifar", {}),
    "data": ("data/tiny", {}),
    "subset": (100, {}),
    "eval_subset": (50, {}),
    "image_size": (24, {}),
    "cache_dir": ("cache", {}),
    "num_classes": (7, {}),
    "label_smoothing": (0.1, {}),
    "augment": (False, {}),
    "holdout": (10, {}),
    "epochs": (2, {}),
    "batch_size": (16, {}),
    "optimizer": ("sgd", {}),
    "lr": (0.01, {}),
    "momentum": (0.5, {}),
    "nesterov": (True, {"optimizer": "sgd"}),
    "weight_decay": (1e-4, {}),
    "lr_schedule": ("cosine", {}),
    "warmup_epochs": (1.0, {}),
    "step_epochs": (5, {}),
    "step_gamma": (0.5, {}),
    "grad_clip": (1.0, {}),
    "grow": (["0.25:net2wider:all:factor=2"], {}),
    "grow_optimizer": ("reset", {"grow": ["step=3:net2deeper:stages"]}),
    "grow_warmup": (10, {"grow": ["epoch=1:net2wider:layer2.0.conv1:factor=1.5"]}),
    "grow_init": ("random", {"grow": ["0.5:any:random:2"]}),
    "grow_kd": ("2:0.5:10", {"grow": ["0.5:net2deeper:stages"]}),
    "seed": (3, {}),
    "device": ("cpu", {}),
    "amp": ("bf16", {}),
    "dtype": ("float64", {}),
    "channels_last": (True, {}),
    "compile": (True, {}),
    "sync_bn": (False, {}),
    "parallel": ("manual", {}),
    "threads": (1, {}),
    "eval_every": (2, {}),
    "log_every": (5, {}),
    "keep_checkpoints": (3, {}),
    "out": ("runs/elsewhere", {}),
    "teacher": (["runs/t1", "runs/t2"], {}),
    "teacher_paths": ("all", {}),
    "teacher_weights": ([2.0], {}),
    "nets": (["resnet18", "resnet18", "resnet18"], {}),
    "cuts": (["layer1"], {}),
    "adapter_batchnorm": (True, {}),
    "always_adapt": (True, {}),
    "schedule": ("joint", {}),
    "cross": ("single", {"cuts": ["layer1", "layer3"]}),
    "cross_weight": (0.5, {}),
    "peer_target": ("ensemble", {"nets": ["resnet18"] * 3}),
    "labeled_fraction": (0.5, {}),
    "unlabeled": ("data/unlabelled", {}),
    "cka_images": (8, {}),
    "shared_prefixes": (False, {}),
    "adapter_update": ("up", {}),
    "temperature": (2.0, {}),
    "kd_alpha": (0.9, {}),
    "exits": (True, {}),
    "exit_head": ("heads:make", {"exits": True}),
    "exit_weights": ([0.5], {"exits": True}),
    "init_from": ("runs/x1", {}),
    "frozen_cohort": (True, {"exits": True, "init_from": "runs/x1"}),
    "widths": ("0.5:1.0", {}),
    "resolutions": ([32, 24], {}),
    "sandwich": (3, {}),
    "width_divisor": (4, {}),
    "eval_widths": ([1.0, 0.5], {}),
    "bn_batches": (5, {}),
    "task": ("causal_lm", {"data": "text:data/corpus"}),
    "seq_len": (64, {"task": "causal_lm", "data": "text:data/corpus"}),
    "tokenizer": ("hf:data/tokenizer", {"task": "causal_lm", "data": "text:data/corpus"}),
    "eval_fraction": (0.25, {"task": "causal_lm", "data": "text:data/corpus"}),
    "student": ("resnet34", {}),
    "soft_weight": (0.5, {}),
    "hard_weight": (0.5, {}),
    "discriminator": ("grl", {}),
    "d_lr": (1e-3, {}),
    "d_hidden": ([8], {}),
}
# the smallest valid config of each method (a method registered by someone else starts from its command's)
BASES: dict[str, dict[str, typing.Any]] = {
    "kd": {"teacher": ["runs/t"]},
    "mutualnet": {"nets": ["resnet18"]},
    "distill": {"student": "resnet18", "teacher": ["runs/t"]},
}
OWN_SAMPLES = {("mutualnet", "nets"): ["resnet34"]}  # a value the method accepts where the common one is refused
SELECTORS = ("format_version", "kind", "mode")  # fixed, or the field that chooses the method itself


def _base(method: Method) -> dict[str, typing.Any]:
    return {**({"mode": method.name} if method.command == "train" else {}), **BASES.get(method.name, {})}


def test_every_field_has_a_sample_and_the_selectors_are_all_that_is_skipped() -> None:
    fields = set(TrainConfig.model_fields) | set(DistillConfig.model_fields)
    assert fields - set(SELECTORS) == set(SAMPLES), "give each new field a sample value here"


@pytest.mark.parametrize("method_name", METHODS.names())
def test_every_option_is_used_by_the_method_or_refused_in_one_line(method_name: str) -> None:
    method = METHODS.get(method_name)
    config_class = CONFIGS[method.command]
    for field_name, field in config_class.model_fields.items():
        if field_name not in SELECTORS:
            _used_or_refused(method, config_class, field_name, field)


def _used_or_refused(method: Method, config_class: type[RunConfig], field_name: str, field: typing.Any) -> None:
    value, companions = SAMPLES[field_name]
    value = OWN_SAMPLES.get((method.name, field_name), value)
    assert value != field.get_default(call_default_factory=True), field_name
    if applies(field_name, field, method):
        config = config_class.from_dict({**_base(method), **companions, field_name: value})
        assert getattr(config, field_name) == value, field_name
        spec = declaration(field)
        if spec is not None and spec["objective"]:  # it reaches the objective under the declared name
            assert method.objective is not None
            objective = method.objective(**objective_options(config, method))
            assert getattr(objective, spec["objective"]) == value, field_name
        return
    with pytest.raises(XrossError) as e:
        config_class.from_dict({**_base(method), field_name: value})
    message = str(e.value)
    users = [m for m in command_methods(method.command) if applies(field_name, field, METHODS.get(m))]
    assert "\n" not in message and users, field_name
    assert f"{field_name} applies to " in message and f"not {method.name}:" in message, message
    assert f"drop --{field_name.replace('_', '-')}" in message, message
    assert all(user in message for user in users), message


def test_general_fields_are_those_without_a_declaration() -> None:
    general = [n for n, f in TrainConfig.model_fields.items() if declaration(f) is None]
    assert "lr" in general and "label_smoothing" in general and "sandwich" not in general
    for method in METHODS.values():
        assert all(applies(n, TrainConfig.model_fields[n], method) for n in general)


@pytest.mark.parametrize(
    ("options", "message"),
    [  # the options the issue found trained to the end as if absent
        ({"mode": "dml", "sandwich": 3}, "sandwich applies to mutualnet, not dml"),
        ({"mode": "xml", "width_divisor": 4}, "width_divisor applies to mutualnet, not xml"),
        ({"mode": "independent", "bn_batches": 5}, "bn_batches applies to mutualnet, not independent"),
        ({"mode": "dml", "kd_alpha": 0.9}, "kd_alpha applies to kd, not dml"),
        ({"mode": "independent", "temperature": 2}, "temperature applies to kd, not independent"),
        ({"mode": "xml", "teacher": ["runs/t"]}, "teacher applies to kd, not xml"),
        ({"mode": "mutualnet", "nets": ["resnet18"], "schedule": "joint"}, "schedule applies to independent, kd"),
    ],
)
def test_the_options_that_were_ignored_are_refused_on_the_command_line(cli, tmp_path, options, message) -> None:
    with pytest.raises(XrossError, match=message):
        TrainConfig.from_dict(options)
    args = [f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}" for k, v in options.items()]
    r = cli("xross", "train", *args, "--out", tmp_path / "r")
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r
    assert not (tmp_path / "r").exists()


def test_a_run_saved_with_an_option_its_method_never_used_still_loads(tmp_path: Path) -> None:
    """Runs written before the refusal may hold such an option: read back without it, with a warning."""
    path = tmp_path / "config.yaml"
    TrainConfig.from_dict({"mode": "dml", "nets": ["resnet18", "resnet18"]}).save(path)
    path.write_text(path.read_text().replace("kd_alpha: 0.5", "kd_alpha: 0.9"))
    assert "kd_alpha: 0.9" in path.read_text()
    with pytest.raises(XrossError, match="kd_alpha applies to kd, not dml"):
        TrainConfig.load(path)  # given as options (--config), it is refused
    with pytest.warns(UserWarning, match="kd_alpha 0.9 was never used by dml"):
        saved = load_config(path)  # a run's own config: read as the run trained
    assert saved == TrainConfig.from_dict({"mode": "dml", "nets": ["resnet18", "resnet18"]})


def test_discriminator_options_are_refused_without_a_discriminator() -> None:
    base = {"student": "resnet18", "teacher": ["runs/t"], "discriminator": "off"}
    for name, value in (("d_lr", 1e-3), ("d_hidden", [8])):
        with pytest.raises(XrossError, match=f"{name} applies with a discriminator"):
            DistillConfig.from_dict({**base, name: value})


def test_mode_name_and_the_table_agree() -> None:
    assert list(typing.get_args(ModeName)) == command_methods("train")
    assert command_methods("distill") == ["distill"]
    assert set(METHODS.names()) == {*typing.get_args(ModeName), "distill"}
    assert METHODS.get("kd").needs_teacher and not METHODS.get("xml").needs_teacher
    assert [METHODS.get(m).kind for m in METHODS.names()] == ["cohort"] * 4 + ["slim", "student"]
    with pytest.raises(XrossError, match="unknown method 'xmll' \\(closest: xml"):
        METHODS.get("xmll")


def test_help_says_which_methods_use_an_option() -> None:
    import typer.main

    from xross.cli.main import app

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    helps = {p.name: p.help or "" for p in command.params}
    assert helps["temperature"].startswith("kd temperature (used by kd) [default: 4.0]")
    assert "(used by mutualnet)" in helps["sandwich"] and "(used by dml and xml)" in helps["peer_target"]
    assert "(used by cohort methods)" in helps["schedule"] and "used by" not in helps["lr"]
    mode = next(p for p in command.params if p.name == "mode")
    assert mode.metavar == "[independent|kd|dml|xml|mutualnet]" and helps["mode"].endswith("[default: xml]")


# --- a method from outside: registered here, no edit anywhere else --------------------------------


@dataclasses.dataclass
class Plain(Mode):
    """The toy objective: each net's own cross-entropy, twice (so it differs from independent's)."""

    def loss(self, i, logits, labels, cohort, teacher=None) -> LossTerms:
        ce = self.ce(logits[cohort.own_path(i)], labels)
        return LossTerms({"ce": ce}, 2 * ce)


@pytest.fixture
def toy() -> typing.Iterator[Method]:
    method = register_method(Method("toy", "twice each net's cross-entropy", Trainer, "cohort", objective=Plain))
    yield method
    METHODS.unregister("toy")


def _toy_options(data: Path, cache: Path, out: Path, epochs: int) -> dict[str, typing.Any]:
    return dict(
        mode="toy", nets=["growth.models:small_vgg"] * 2, cuts=["features.1"], data=str(data), image_size=32,
        subset=64, eval_subset=40, batch_size=32, epochs=epochs, cache_dir=str(cache), out=str(out), threads=1,
    )  # fmt: skip


def test_a_toy_method_trains_resumes_evaluates_and_exports(toy, tmp_path, synthetic_archive, data_cache, cli) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    xross.train(progress=False, **_toy_options(synthetic_archive, data_cache, straight, 2))
    xross.train(progress=False, **_toy_options(synthetic_archive, data_cache, resumed, 1))
    result = xross.train(resume=True, progress=False, out=str(resumed), epochs=2)
    _, a = load_run(straight)
    _, b = load_run(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name  # resumed bit for bit
    assert TrainConfig.load(resumed / "config.yaml").mode == "toy" and len(result.paths) == 4
    with open(resumed / "steps.csv") as f:  # the toy's objective is what trained: its loss is twice the CE
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["loss0"]) == pytest.approx(2 * float(r["ce0"]), rel=1e-5) for r in rows)
    r = cli("xross", "eval", resumed)
    assert r.code == 0 and "paths of" in r.out, r
    assert json.loads((resumed / "eval.json").read_text())["paths"][0]["top1"] == result.paths[0].top1
    r = cli("xross", "export", resumed, "--path", "0,1", "--out", tmp_path / "hybrid")
    assert r.code == 0 and "saved path 0,1" in r.out, r
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(surgery.load(tmp_path / "hybrid")(x), b.export_path((0, 1))(x))
    r = cli("xross", "train", "--mode", "toy", "--temperature", "2", "--out", tmp_path / "no")
    assert r.code == 2 and "temperature applies to kd, not toy" in r.err, r
