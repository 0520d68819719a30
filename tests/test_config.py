"""xross.run.config: TrainConfig and DistillConfig are the single source of the run options, file schema and CLI."""

from __future__ import annotations

import typing

import pytest
import yaml

from surgery.cli.kit import option_name
from xross.cli.main import app
from xross.errors import XrossError
from xross.run.config import DistillConfig, RunConfig, TrainConfig, load_config


def _params(command: str) -> dict[str, typing.Any]:
    import typer.main

    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {p.name: p for p in cmd.params}


@pytest.mark.parametrize(("command", "model"), [("train", TrainConfig), ("distill", DistillConfig)])
def test_every_field_has_an_option_with_the_same_choices(command: str, model: type[RunConfig]) -> None:
    params = _params(command)
    for name, field in model.model_fields.items():
        if name in ("format_version", "kind"):
            continue
        option = params.get(option_name(name, field))
        assert option is not None, f"{model.__name__}.{name} has no `xross {command}` option"
        if typing.get_origin(field.annotation) is typing.Literal:
            assert set(typing.get_args(option.type_descriptor.annotation)) == set(typing.get_args(field.annotation)), (
                name
            )
        assert field.description and field.description in (option.help or ""), f"--{name} help is not the field's"


def test_options_given_on_the_command_line_reach_the_config(cli, tmp_path) -> None:
    r = cli("xross", "train", "--nets", "resnet18,resnet34", "--mode", "xmll", "--out", tmp_path / "r")
    assert r.code == 2 and "'xmll'" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"epochs": "3"}, "field 'epochs' should be a valid integer, found str '3'"),
        ({"epochs": 0}, "field 'epochs' should be greater than 0"),
        ({"nets": "resnet18"}, "field 'nets' should be a valid list"),
        ({"nets": ["resnet18"]}, "mode xml learns from peers: give at least two nets in --nets"),
        ({"mode": "xmll"}, "field 'mode' should be 'independent', 'kd', 'dml', 'xml' or 'mutualnet'"),
        ({"colour": 1}, "field 'colour' is not a known field"),
        ({"mode": "kd"}, "mode kd needs a teacher"),
        ({"optimizer": "adam", "nesterov": True}, "nesterov applies to the sgd optimizer only"),
        ({"format_version": 7}, "newer than this installation reads"),
    ],
)
def test_bad_configs_are_one_line_naming_the_field(tmp_path, data: dict, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(XrossError, match=message) as e:
        TrainConfig.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_round_trip_and_numbers_written_as_text(tmp_path) -> None:
    cfg = TrainConfig(nets=["resnet18", "resnet34"], epochs=3, lr=3e-4)
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg
    (tmp_path / "d.yaml").write_text("lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as text; a number is meant
    assert TrainConfig.load(tmp_path / "d.yaml").lr == 1e-4


def test_kind_selects_the_config_class_and_comma_lists_convert(cli, tmp_path) -> None:
    distill = DistillConfig(student="resnet18", teacher=["runs/x1"], d_hidden=[8, 4], teacher_weights=[1, 2])
    distill.save(tmp_path / "d.yaml")
    assert load_config(tmp_path / "d.yaml") == distill
    text = (tmp_path / "d.yaml").read_text()
    assert text.startswith("format_version: 1\nkind: distill\nstudent: resnet18\n")  # its own fields first
    (tmp_path / "t.yaml").write_text("epochs: 2\n")  # files from before `kind` existed are training runs
    assert isinstance(load_config(tmp_path / "t.yaml"), TrainConfig)
    (tmp_path / "x.yaml").write_text("kind: prune\n")
    with pytest.raises(XrossError, match="field 'kind' is 'prune'; expected one of train, distill"):
        load_config(tmp_path / "x.yaml")
    r = cli("xross", "distill", "--student", "resnet18", "--teacher", "t", "--d-hidden", "8,x", "--out", tmp_path / "r")
    assert r.code == 2 and "d_hidden" in r.err and len(r.err.strip().splitlines()) == 1, r


def test_semi_supervised_options_are_refused_where_they_mean_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="independent learns nothing"):
        TrainConfig(mode="independent", unlabeled=str(tmp_path))
    with pytest.raises(ValueError, match="mutualnet has no semi-supervised"):
        TrainConfig(mode="mutualnet", nets=["resnet18"], labeled_fraction=0.5)


def test_mutual_options_are_refused_for_modes_without_the_term() -> None:
    with pytest.raises(ValueError, match="peer_target applies to dml and xml"):
        TrainConfig(mode="independent", peer_target="ensemble")
    with pytest.raises(ValueError, match="cross_weight applies to xml"):
        TrainConfig(mode="dml", cross_weight=0.5)
    with pytest.raises(ValueError, match="ensemble equals mean"):
        TrainConfig(mode="dml", peer_target="ensemble")  # two nets: the same objective
    with pytest.raises(ValueError, match="single equals all"):
        TrainConfig(mode="xml", cross="single")  # two parts: the same paths
    TrainConfig(mode="dml", peer_target="ensemble", nets=["resnet18"] * 3)
    TrainConfig(mode="xml", cross="single", cuts=["layer1", "layer3"])
