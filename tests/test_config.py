"""xross.config: TrainConfig is the single source of the run options, the config file schema and the CLI."""

from __future__ import annotations

import typing

import pytest
import yaml

from surgery.clikit import option_name
from xross.cli import app
from xross.config import TrainConfig
from xross.errors import XrossError


def _train_params() -> dict[str, typing.Any]:
    import typer.main

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


def test_every_field_has_an_option_with_the_same_choices() -> None:
    params = _train_params()
    for name, field in TrainConfig.model_fields.items():
        if name == "format_version":
            continue
        option = params.get(option_name(name, field))
        assert option is not None, f"TrainConfig.{name} has no `xross train` option"
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
        ({"nets": ["resnet18"]}, "field 'nets' should have at least 2 items"),
        ({"mode": "xmll"}, "field 'mode' should be 'independent', 'kd', 'dml' or 'xml'"),
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
