"""The complete description of a run; saved as ``config.yaml`` in the run directory.

:class:`TrainConfig` (``xross train``: a cohort) and :class:`DistillConfig` (``xross
distill``: one student from teachers) are each the single source of their options:
defaults, types and choices, validation, the schema of ``config.yaml`` and the
command-line options (generated from the fields by :mod:`surgery.cli.kit`). What every
run shares (data, optimisation, engine) lives once, in :class:`RunConfig`; the teacher
options of ``kd`` and ``distill`` once, in :class:`TeacherOptions`. ``kind`` says which
a ``config.yaml`` holds (:func:`load_config`). ``xross train --config runs/x1/config.yaml``
repeats a run exactly.

>>> cfg = TrainConfig(nets=["resnet34", "resnet18"], mode="dml", epochs=5)
>>> cfg.epochs, cfg.lr
(5, 0.0001)
>>> TrainConfig.from_dict({"epochs": "five"}, "config.yaml")
Traceback (most recent call last):
...
xross.errors.XrossError: config.yaml: field 'epochs' should be a valid integer, found str 'five'; fix or ...
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from surgery.core.registry import Registry
from surgery.core.schema import Float
from xross.errors import XrossError
from xross.run.base_config import RunConfig, TaskOptions, TeacherOptions, cli_hint, read_yaml, refuse_unused_options
from xross.run.table import command_methods, method_of, saved_without_unused_options, uses

# the --mode values of the methods xross registers (the table, xross.run.table, is what validates a mode)
ModeName = Literal["independent", "kd", "dml", "xml", "mutualnet"]
ScheduleName = Literal["alternate", "joint"]
CrossName = Literal["all", "single"]
PeerTargetName = Literal["mean", "ensemble"]
AdapterUpdate = Literal["student", "up", "down"]
DiscriminatorName = Literal["joint", "grl", "off"]
KindName = Literal["train", "distill"]

LM_DEFAULT_CUT = "block:half"  # xross.cohort.lm resolves it in each decoder
COHORT = uses(kinds=("cohort",))  # the fields every method training a cohort of cut networks uses
MUTUALNET = uses("mutualnet")


class TrainConfig(TeacherOptions, TaskOptions, RunConfig):
    """Every option of a cohort's training run (see the field descriptions; ``xross train --help`` shows them).

    >>> import xross
    >>> config = xross.TrainConfig(mode="xml", nets=["resnet34", "resnet18"], cuts=["layer2"], epochs=2)
    >>> config.mode, config.nets, config.cuts
    ('xml', ['resnet34', 'resnet18'], ['layer2'])
    >>> xross.TrainConfig.from_dict({"mode": "dml", "nets": ["resnet34", "resnet18"], "sandwich": 3})
    Traceback (most recent call last):
    ...
    xross.errors.XrossError: the configuration: sandwich applies to mutualnet, not dml: ...
    """

    kind: Literal["train"] = Field("train", description="what this run does: train a cohort")
    nets: list[str] = Field(
        default_factory=lambda: ["resnet34", "resnet18"],
        min_length=1,
        json_schema_extra=cli_hint(comma=True),
        description="comma-separated networks (torchvision names, package.module:callable, timm:NAME, hf:DIR); "
        "one for mutualnet",
    )
    cuts: list[str] = Field(
        default_factory=lambda: ["layer2"],
        min_length=1,
        json_schema_extra=cli_hint("cut"),
        description="cut point: one name for all nets or one per net 'a,b'; repeat for P > 2 parts "
        "(causal_lm: block:N cuts after decoder layer N, block:half in the middle, the default there)",
    )
    adapter_batchnorm: bool = Field(
        False, json_schema_extra=COHORT, description="BatchNorm (LayerNorm for tokens) after each adapter"
    )
    always_adapt: bool = Field(
        False, json_schema_extra=COHORT, description="adapters between every pair of nets, even where shapes agree"
    )
    mode: str = Field(
        "xml", description="training method (mutualnet: one net at every width and resolution, see --widths)"
    )
    schedule: ScheduleName = Field(
        "alternate",
        json_schema_extra=COHORT,
        description="alternate: each student's loss trains only it; joint: one backward",
    )
    cross: CrossName = Field(
        "all",
        json_schema_extra=uses("xml", objective="cross"),
        description="xml cross paths: all, or single (one part away from the own path)",
    )
    cross_weight: Float = Field(
        1.0,
        ge=0,
        json_schema_extra=uses("xml", objective="cross_weight"),
        description="xml: weight of the cross-path terms (1: the research's)",
    )
    peer_target: PeerTargetName = Field(
        "mean",
        json_schema_extra=uses("dml", "xml", objective="peer_target"),
        description="dml/xml mutual term: mean of the KL to each peer, or KL to the peers' ensemble (DML_e)",
    )
    labeled_fraction: Float = Field(
        1.0,
        gt=0,
        le=1,
        json_schema_extra=COHORT,
        description="semi-supervised: the stratified fraction of training images that keep a label",
    )
    unlabeled: str | None = Field(
        None,
        json_schema_extra=uses("kd", "dml", "xml"),
        description="semi-supervised: a folder of unlabelled images added to training (mutual terms only)",
    )
    cka_images: NonNegativeInt = Field(
        0,
        json_schema_extra=COHORT,
        description="linear CKA of the nets' features at every cut in epochs.csv, on this many test images (0: off)",
    )
    shared_prefixes: bool = Field(
        True,
        json_schema_extra=COHORT,
        description="compute each path prefix once per step (off: every path from scratch)",
    )
    adapter_update: AdapterUpdate = Field(
        "student",
        json_schema_extra=COHORT,
        description="which student's loss trains an adapter: any touching it, the one it leaves, or enters",
    )
    temperature: Float = Field(
        4.0, gt=0, json_schema_extra=uses("kd", objective="temperature"), description="kd temperature"
    )
    kd_alpha: Float = Field(
        0.5, ge=0, le=1, json_schema_extra=uses("kd", objective="alpha"), description="kd weight of the hard-label CE"
    )
    # any-time exits
    exits: bool = Field(
        False,
        json_schema_extra=COHORT,
        description="an exit head after every part of every net, trained with the cohort",
    )
    exit_head: str | None = Field(
        None,
        json_schema_extra=COHORT,
        description="exits: head factory 'module:callable' called as f(channels, num_classes) (default: pool + linear)",
    )
    exit_weights: list[Float] | None = Field(
        None,
        json_schema_extra={**COHORT, **cli_hint(comma=True)},
        description="exits: weight of each boundary's exit CE, one per cut (default 1 each)",
    )
    init_from: str | None = Field(
        None,
        json_schema_extra=COHORT,
        description="start the cohort from this train run's newest weights (same nets and cuts)",
    )
    frozen_cohort: bool = Field(
        False,
        json_schema_extra=COHORT,
        description="train the exit heads only; the cohort stays as --init-from left it (xross add-exits)",
    )
    # mutualnet
    widths: str | None = Field(
        None,
        json_schema_extra=MUTUALNET,
        description="mutualnet: the width range trained, LOW:HIGH fractions of the full width (default 0.25:1.0)",
    )
    resolutions: list[PositiveInt] | None = Field(
        None,
        json_schema_extra={**MUTUALNET, **cli_hint(comma=True)},
        description="mutualnet: input resolutions, e.g. 32,28,24,20 (default: the image size only)",
    )
    sandwich: int = Field(
        4,
        ge=1,
        json_schema_extra=MUTUALNET,
        description="mutualnet: networks per step (widest, narrowest and N-2 random; 1: the widest alone)",
    )
    width_divisor: PositiveInt = Field(
        8, json_schema_extra=MUTUALNET, description="mutualnet: kept channel counts are multiples of this"
    )
    eval_widths: list[Float] | None = Field(
        None,
        json_schema_extra={**MUTUALNET, **cli_hint(comma=True)},
        description="mutualnet: widths of the evaluated grid (default: 4 evenly spaced over --widths)",
    )
    bn_batches: PositiveInt = Field(
        20,
        json_schema_extra=MUTUALNET,
        description="mutualnet: training batches that recalibrate BatchNorm for each evaluated setting",
    )

    @field_validator("widths")
    @classmethod
    def _width_range(cls, value: str | None) -> str | None:
        if value is None:
            return value
        low, sep, high = value.partition(":")
        try:
            lo, hi = float(low), float(high)
        except ValueError:
            raise ValueError("should be LOW:HIGH fractions of the full width, e.g. 0.25:1.0") from None
        if not sep or not 0 < lo <= hi <= 1:
            raise ValueError("should be LOW:HIGH with 0 < LOW <= HIGH <= 1, e.g. 0.25:1.0")
        return value

    def width_range(self) -> tuple[float, float]:
        low, _, high = (self.widths or "0.25:1.0").partition(":")
        return float(low), float(high)

    def grid(self) -> tuple[list[float], list[int]]:
        """The widths and resolutions a mutualnet run is evaluated at (widest and largest first)."""
        lo, hi = self.width_range()
        widths = self.eval_widths or [round(hi - i * (hi - lo) / 3, 4) for i in range(4)]
        resolutions = self.resolutions or ([self.image_size] if self.image_size else [])
        return sorted(set(widths), reverse=True), sorted(set(resolutions), reverse=True)

    @field_validator("mode")
    @classmethod
    def _known_method(cls, value: str) -> str:
        names = command_methods("train")
        if value not in names:
            quoted = [f"'{n}'" for n in names]
            raise ValueError(f"should be {', '.join(quoted[:-1])} or {quoted[-1]}" if len(names) > 1 else quoted[0])
        return value

    @property
    def method(self) -> str:
        """The name of the method in the table (:mod:`xross.run.table`) this config trains: its ``mode``."""
        return self.mode

    @model_validator(mode="before")
    @classmethod
    def _task_default_cut(cls, data: Any) -> Any:
        """A causal_lm run without --cut cuts each decoder in the middle (``layer2`` names no decoder's layer)."""
        if isinstance(data, dict) and data.get("task") == "causal_lm" and "cuts" not in data:
            return {**data, "cuts": [LM_DEFAULT_CUT]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        refuse_unused_options(self)
        self.refuse_options_of_other_task()
        self.refuse_growth_options_without_growth()
        self._consistent_exits()
        if self.grow and self.exits:
            raise ValueError("exit heads do not grow with their nets yet: drop --grow or --exits")
        method = method_of(self)
        if method.needs_teacher and not self.teacher:
            raise ValueError(
                f"mode {self.mode} needs a teacher (--teacher: a run directory or a saved model, e.g. from "
                "`xross export`)"
            )
        if method.check is not None:
            method.check(self)
        return self

    def _consistent_exits(self) -> None:
        if not self.exits:
            given = [n for n in ("exit_head", "exit_weights") if getattr(self, n) is not None]
            if given or self.frozen_cohort:
                name = given[0] if given else "frozen_cohort"
                raise ValueError(f"{name} applies with --exits only; add --exits or drop it")
        if self.exit_weights is not None and len(self.exit_weights) != len(self.cuts):
            raise ValueError(f"exit_weights needs one weight per cut ({len(self.cuts)}), not {len(self.exit_weights)}")
        if self.frozen_cohort and not self.init_from:
            raise ValueError("frozen_cohort trains exit heads on a trained cohort; give --init-from RUN")

    def default_holdout(self, train_images: int, num_classes: int) -> int:
        """With exits, a tenth of the training images (at least one per class) calibrate the exit thresholds."""
        return max(num_classes, round(train_images / 10)) if self.exits else 0

    def exit_weight_list(self) -> list[float]:
        """The weight of each boundary's exit term (one per cut)."""
        return list(self.exit_weights) if self.exit_weights is not None else [1.0] * len(self.cuts)

    def per_net_cuts(self) -> list[list[str]]:
        """Cut names per net from ``cuts`` entries like ``"layer2"`` or ``"layer2,features.4"``."""
        per_net: list[list[str]] = [[] for _ in self.nets]
        for entry in self.cuts:
            names = [n.strip() for n in entry.split(",")]
            if len(names) == 1:
                names = names * len(self.nets)
            if len(names) != len(self.nets):
                raise XrossError(
                    f"cut '{entry}' names {len(names)} points but there are {len(self.nets)} nets; "
                    "give one name, or one per net"
                )
            for k, n in enumerate(names):
                per_net[k].append(n)
        return per_net


class DistillConfig(TeacherOptions, RunConfig):
    """Every option of a distillation run (MEAL V2 by default; ``xross distill --help`` shows them).

    The loss is ``soft_weight * T^2 * CE(mean_k w_k softmax(t_k / T), softmax(s / T)) +
    hard_weight * CE(s, y)`` plus, unless ``discriminator="off"``, the discriminator's
    binary cross-entropy (see :mod:`xross.methods.discriminator` for its sign in the student).

    >>> import xross
    >>> config = xross.DistillConfig(teacher=["runs/cohort"], student="resnet18", epochs=1)
    >>> config.student, config.temperature, config.discriminator
    ('resnet18', 1.0, 'joint')
    """

    kind: Literal["distill"] = Field("distill", description="what this run does: distil teachers into a student")
    student: str = Field(
        description="the student: a model reference (resnet18, timm:NAME, ...), a run's path (runs/x1@0-0, "
        "with its trained weights) or a saved model or pieces directory"
    )
    temperature: Float = Field(1.0, gt=0, description="softmax temperature of the soft target (MEAL V2: 1)")
    soft_weight: Float = Field(1.0, ge=0, description="weight of the soft cross-entropy to the teachers' ensemble")
    hard_weight: Float = Field(0.0, ge=0, description="weight of the one-hot-label cross-entropy (MEAL V2: 0)")
    discriminator: DiscriminatorName = Field(
        "joint",
        description="joint: its loss added to the student's (MEAL V2); grl: reversed into the student (MEAL v1); off",
    )
    d_lr: Float | None = Field(
        None, gt=0, description="discriminator learning rate (default: --lr); follows the schedule"
    )
    d_hidden: list[PositiveInt] | None = Field(
        None,
        json_schema_extra=cli_hint(comma=True),
        description="discriminator hidden widths (default: C/8,C/64 as MEAL V2, at least 8 each)",
    )

    @property
    def method(self) -> str:
        """The name of the method in the table (:mod:`xross.run.table`): ``distill``."""
        return "distill"

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        refuse_unused_options(self)
        self.refuse_growth_options_without_growth()
        if self.discriminator == "off" and (self.d_lr is not None or self.d_hidden is not None):
            name = "d_lr" if self.d_lr is not None else "d_hidden"
            raise ValueError(
                f"{name} applies with a discriminator; drop --{name.replace('_', '-')} or set "
                "--discriminator joint or grl"
            )
        if not self.teacher:
            raise ValueError("distillation needs at least one --teacher (a run directory, RUN@0-1 or a saved model)")
        if self.soft_weight == 0 and self.hard_weight == 0:
            raise ValueError("soft_weight and hard_weight are both 0: nothing would be learned")
        return self


CONFIGS: Registry[type[RunConfig]] = Registry("kind of run config", error=XrossError)  # config.yaml's ``kind``
CONFIGS.register("train", TrainConfig)
CONFIGS.register("distill", DistillConfig)


def load_config(path: str | Path) -> TrainConfig | DistillConfig:
    """The config of a run directory's ``config.yaml``, of the class its ``kind`` names (default ``train``)."""
    data = read_yaml(path)
    kind = data.get("kind", "train") if isinstance(data, dict) else "train"
    if not isinstance(kind, str) or kind not in CONFIGS:
        raise XrossError(f"{path}: field 'kind' is '{kind}'; expected one of {', '.join(CONFIGS)}")
    config_class = CONFIGS[kind]
    kept, notes = saved_without_unused_options(config_class, data, str(path))
    config = config_class.from_dict(kept, str(path))
    for note in notes:  # only once the run reads: a file broken otherwise gets its one-line error alone
        warnings.warn(note, stacklevel=2)
    return config  # type: ignore[return-value]


ConfigT = TypeVar("ConfigT", bound=RunConfig)


RESUME_MAY_CHANGE = ("out", "epochs", "device", "threads", "log_every", "eval_every", "cache_dir")


def config_from_options(
    config_class: type[ConfigT], options: dict[str, Any], *, resume: bool = False, base: str | Path | None = None
) -> ConfigT:
    """The config of a run from keyword options: over the ``base`` config file if given, or, with
    ``resume``, over the run's own config in ``options["out"]``, where only the options in
    ``RESUME_MAY_CHANGE`` (which do not change the computation) may be given."""
    if not resume:
        saved = config_class.load(base).model_dump() if base else {}
        command = config_class.model_fields["kind"].default
        return config_class.from_dict({**saved, **options}, "the options", f"see `xross {command} --help`")
    if "out" not in options:
        raise XrossError("--resume needs --out RUN_DIR (the run to continue)")
    path = Path(options["out"]) / "config.yaml"
    if not path.is_file():
        raise XrossError(f"cannot resume: '{path}' does not exist; start the run without --resume")
    changed = [k for k in options if k not in RESUME_MAY_CHANGE]
    if changed:
        raise XrossError(
            f"--resume continues the run as it was configured; drop --{changed[0].replace('_', '-')} "
            f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may be given)"
        )
    saved_config = load_config(path)
    kind = method_of(saved_config).command  # the command that makes (and resumes) the run's method
    if kind != config_class.model_fields["kind"].default:
        raise XrossError(
            f"cannot resume: '{options['out']}' is a {kind} run; continue it with "
            f"`xross {kind} --resume --out {options['out']}`"
        )
    return config_class.from_dict({**saved_config.model_dump(), **options}, str(path))


def resolve_config(
    config_class: type[ConfigT], config: ConfigT | None, overrides: dict[str, Any], *, resume: bool = False
) -> ConfigT:
    """The config of a Python call like ``xross.train(config, epochs=3)``: ``config`` (or the defaults) with
    ``overrides`` validated as fields; with ``resume``, the run in ``config.out`` (or ``overrides["out"]``)."""
    if config is None:
        return config_from_options(config_class, overrides, resume=resume)
    if resume:
        return config_from_options(config_class, {"out": config.out, **overrides}, resume=True)
    return config_from_options(config_class, {**config.model_dump(), **overrides})
