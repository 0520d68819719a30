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

import re
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import yaml
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, field_validator, model_validator

from surgery.core.errors import SurgeryError
from surgery.core.schema import DEFAULT_FIX, FileModel, Float, parse
from surgery.core.util import atomic_write_text, first_line
from xross.errors import XrossError
from xross.methods.objectives import MODES

ModeName = Literal["independent", "kd", "dml", "xml", "mutualnet"]
ScheduleName = Literal["alternate", "joint"]
CrossName = Literal["all", "single"]
PeerTargetName = Literal["mean", "ensemble"]
AdapterUpdate = Literal["student", "up", "down"]
StemName = Literal["imagenet", "cifar"]
OptimizerName = Literal["sgd", "adam", "adamw"]
LrScheduleName = Literal["constant", "cosine", "step"]
AmpName = Literal["off", "bf16", "fp16"]
DtypeName = Literal["float32", "float64"]
DiscriminatorName = Literal["joint", "grl", "off"]
KindName = Literal["train", "distill"]

# CLI hints carried by fields: the option name when it differs, how a list is given
CLI = "cli"


def _cli(name: str | None = None, *, comma: bool = False) -> dict[str, Any]:
    return {CLI: {"name": name, "comma": comma}}


class RunConfig(FileModel):
    """What every run has: its data, optimisation and engine; loading, saving and validation."""

    format_version: Literal[1] = Field(1, description="version of this file's layout")
    stem: StemName = Field(
        "imagenet", description="imagenet, or cifar (3x3 stride-1 conv1, no maxpool; ResNets built by name)"
    )
    # data
    data: str = Field(
        "cifar10", description="cifar10 | cifar100 | ImageFolder (train/; test/ or val/) | a .tar(.gz/.xz)"
    )
    subset: PositiveInt | None = Field(None, description="stratified subset of the training split")
    eval_subset: PositiveInt | None = Field(None, description="stratified subset of the evaluation split")
    image_size: PositiveInt | None = Field(None, description="resize images to this side (default: as stored)")
    cache_dir: str | None = Field(
        None, description="decoded-data cache directory (default $XROSS_CACHE or ~/.cache/xross)"
    )
    num_classes: PositiveInt | None = Field(None, description="classifier outputs (default: the data's classes)")
    label_smoothing: Float = Field(0.0, ge=0, lt=1, description="label smoothing of every CE term")
    augment: bool = Field(True, description="random crop and flip of training images (off: the research's setting)")
    holdout: NonNegativeInt | None = Field(
        None,
        description="training images held out (stratified, never trained on) to calibrate exit thresholds "
        "(default: a tenth with --exits, else none)",
    )
    # optimisation
    epochs: PositiveInt = Field(30, description="epochs")
    batch_size: PositiveInt = Field(64, description="global batch size")
    optimizer: OptimizerName = Field("adam", description="optimizer (adam, as the research)")
    lr: Float = Field(1e-4, gt=0, description="learning rate")
    momentum: Float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd)")
    weight_decay: NonNegativeFloat = Field(0.0, description="weight decay")
    lr_schedule: LrScheduleName = Field("constant", description="learning-rate schedule after the warm-up")
    warmup_epochs: NonNegativeFloat = Field(0.0, description="linear warm-up epochs")
    step_epochs: PositiveInt = Field(30, description="step schedule: epochs between decays")
    step_gamma: Float = Field(0.1, gt=0, description="step schedule: factor of each decay")
    grad_clip: Float | None = Field(None, gt=0, description="clip the global gradient norm to this")
    # engine
    seed: NonNegativeInt = Field(0, description="random seed (weights, data order, augmentation)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda | cuda:N")
    amp: AmpName = Field("off", description="mixed precision (CUDA only)")
    dtype: DtypeName = Field("float32", description="float64 for exact comparisons and debugging")
    channels_last: bool = Field(False, description="channels-last memory format (CUDA)")
    compile: bool = Field(False, description="torch.compile the trained networks (CUDA)")
    sync_bn: bool = Field(True, description="global BatchNorm statistics when data-parallel")
    threads: PositiveInt | None = Field(None, description="CPU threads")
    eval_every: NonNegativeInt = Field(1, description="evaluate the full nets every N epochs (0: only at the end)")
    log_every: PositiveInt = Field(10, description="log every N steps")
    keep_checkpoints: PositiveInt = Field(2, description="how many of the newest checkpoints to keep")
    out: str = Field("runs/xross", description="run directory")

    @model_validator(mode="after")
    def _consistent_optimizer(self) -> RunConfig:
        if self.nesterov and self.optimizer != "sgd":
            raise ValueError("nesterov applies to the sgd optimizer only")
        return self

    def default_holdout(self, train_images: int, num_classes: int) -> int:
        """Images held out of training when ``holdout`` is not given (none unless a run calibrates something)."""
        return 0

    @classmethod
    def ordered_fields(cls) -> list[str]:
        """Field names, the run's own first (kind, its models and objective), then teachers, data, engine."""
        own = [name for klass in cls.__mro__ for name in vars(klass).get("__annotations__", {})]
        first = ["format_version", "kind"]
        seen = dict.fromkeys([*first, *own])
        return [name for name in seen if name in cls.model_fields]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        return yaml.safe_dump({name: data[name] for name in self.ordered_fields()}, sort_keys=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: Any, where: str = "the configuration", fix: str = DEFAULT_FIX) -> Self:
        """Validate a mapping of options; one-line :class:`XrossError` naming the field (then ``fix``) otherwise."""
        try:
            return parse(cls, data, where, fix)
        except SurgeryError as e:
            raise XrossError(str(e)) from None

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.from_dict(_read_yaml(path), str(path))


class TeacherOptions(FileModel):
    """Teachers of ``kd`` training and of distillation: references, which paths of a run, weights."""

    teacher: list[str] = Field(
        default_factory=list,
        description="teacher: a run directory, RUN@0-1, a saved model or pieces directory, or a model reference "
        "with weights, e.g. 'resnet18(weights=\"t.safetensors\")' (repeat for an ensemble)",
    )
    teacher_paths: str = Field(
        "full",
        description="which paths of a run-directory teacher: all (every stitched path), full (its K nets), "
        "or a list like 0-1,1-0",
    )
    teacher_weights: list[Float] | None = Field(
        None, json_schema_extra=_cli(comma=True), description="weight of each teacher in the ensemble (default equal)"
    )

    @field_validator("teacher_paths")
    @classmethod
    def _paths_list(cls, value: str) -> str:
        if not re.fullmatch(r"all|full|\d+(-\d+)+(,\d+(-\d+)+)*", value):
            raise ValueError("should be all, full or a list of paths like 0-1,1-0")
        return value


class TrainConfig(TeacherOptions, RunConfig):
    """Every option of a cohort's training run (see the field descriptions; ``xross train --help`` shows them)."""

    kind: Literal["train"] = Field("train", description="what this run does: train a cohort")
    nets: list[str] = Field(
        default_factory=lambda: ["resnet34", "resnet18"],
        min_length=1,
        json_schema_extra=_cli(comma=True),
        description="comma-separated networks (torchvision names, package.module:callable, timm:NAME, hf:DIR); "
        "one for mutualnet",
    )
    cuts: list[str] = Field(
        default_factory=lambda: ["layer2"],
        min_length=1,
        json_schema_extra=_cli("cut"),
        description="cut point: one name for all nets or one per net 'a,b'; repeat for P > 2 parts",
    )
    adapter_batchnorm: bool = Field(False, description="BatchNorm (LayerNorm for tokens) after each adapter")
    always_adapt: bool = Field(False, description="adapters between every pair of nets, even where shapes agree")
    mode: ModeName = Field(
        "xml", description="training objective (mutualnet: one net at every width and resolution, see --widths)"
    )
    schedule: ScheduleName = Field(
        "alternate", description="alternate: each student's loss trains only it; joint: one backward"
    )
    cross: CrossName = Field("all", description="xml cross paths: all, or single (one part away from the own path)")
    cross_weight: Float = Field(1.0, ge=0, description="xml: weight of the cross-path terms (1: the research's)")
    peer_target: PeerTargetName = Field(
        "mean", description="dml/xml mutual term: mean of the KL to each peer, or KL to the peers' ensemble (DML_e)"
    )
    labeled_fraction: Float = Field(
        1.0, gt=0, le=1, description="semi-supervised: the stratified fraction of training images that keep a label"
    )
    unlabeled: str | None = Field(
        None, description="semi-supervised: a folder of unlabelled images added to training (mutual terms only)"
    )
    cka_images: NonNegativeInt = Field(
        0, description="linear CKA of the nets' features at every cut in epochs.csv, on this many test images (0: off)"
    )
    shared_prefixes: bool = Field(
        True, description="compute each path prefix once per step (off: every path from scratch)"
    )
    adapter_update: AdapterUpdate = Field(
        "student", description="which student's loss trains an adapter: any touching it, the one it leaves, or enters"
    )
    temperature: Float = Field(4.0, gt=0, description="kd temperature")
    kd_alpha: Float = Field(0.5, ge=0, le=1, description="kd weight of the hard-label CE")
    # any-time exits
    exits: bool = Field(False, description="an exit head after every part of every net, trained with the cohort")
    exit_head: str | None = Field(
        None,
        description="exits: head factory 'module:callable' called as f(channels, num_classes) (default: pool + linear)",
    )
    exit_weights: list[Float] | None = Field(
        None,
        json_schema_extra=_cli(comma=True),
        description="exits: weight of each boundary's exit CE, one per cut (default 1 each)",
    )
    init_from: str | None = Field(
        None, description="start the cohort from this train run's newest weights (same nets and cuts)"
    )
    frozen_cohort: bool = Field(
        False, description="train the exit heads only; the cohort stays as --init-from left it (xross add-exits)"
    )
    # mutualnet
    widths: str | None = Field(
        None, description="mutualnet: the width range trained, LOW:HIGH fractions of the full width (default 0.25:1.0)"
    )
    resolutions: list[PositiveInt] | None = Field(
        None,
        json_schema_extra=_cli(comma=True),
        description="mutualnet: input resolutions, e.g. 32,28,24,20 (default: the image size only)",
    )
    sandwich: int = Field(
        4, ge=1, description="mutualnet: networks per step (widest, narrowest and N-2 random; 1: the widest alone)"
    )
    width_divisor: PositiveInt = Field(8, description="mutualnet: kept channel counts are multiples of this")
    eval_widths: list[Float] | None = Field(
        None,
        json_schema_extra=_cli(comma=True),
        description="mutualnet: widths of the evaluated grid (default: 4 evenly spaced over --widths)",
    )
    bn_batches: PositiveInt = Field(
        20, description="mutualnet: training batches that recalibrate BatchNorm for each evaluated setting"
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

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        mutual = ("widths", "resolutions", "eval_widths")
        self._consistent_exits()
        if self.mode == "mutualnet":
            if self.labeled_fraction < 1 or self.unlabeled:
                raise ValueError("mutualnet has no semi-supervised mode; drop --labeled-fraction/--unlabeled")
            if self.exits or self.init_from:
                raise ValueError("mutualnet has no parts to exit from; drop --exits/--init-from")
            if len(self.nets) != 1:
                raise ValueError(f"mutualnet trains one net; give one in --nets, not {len(self.nets)}")
            if self.teacher:
                raise ValueError("mutualnet distils its own widest network; drop --teacher")
            if self.eval_widths and not all(0 < w <= 1 for w in self.eval_widths):
                raise ValueError("eval_widths should be fractions in (0, 1]")
            return self
        if len(self.nets) < 2 and self.mode in ("dml", "xml"):
            raise ValueError(f"mode {self.mode} learns from peers: give at least two nets in --nets (else independent)")
        given = [name for name in mutual if getattr(self, name) is not None]
        if given:
            raise ValueError(f"{given[0]} applies to --mode mutualnet only; drop it or set --mode mutualnet")
        if self.peer_target != "mean" and self.mode not in ("dml", "xml"):
            raise ValueError(f"peer_target applies to dml and xml, not {self.mode}; drop --peer-target")
        if self.peer_target == "ensemble" and len(self.nets) < 3:
            raise ValueError("with two nets peer_target ensemble equals mean (one peer); give three or more nets")
        if self.cross == "single" and len(self.cuts) < 2:
            raise ValueError("with two parts cross single equals all; cut twice (--cut A --cut B) for it to differ")
        if self.cross_weight != 1 and self.mode != "xml":
            raise ValueError(f"cross_weight applies to xml, not {self.mode}; drop --cross-weight")
        if self.unlabeled and self.mode == "independent":
            raise ValueError("independent learns nothing from unlabelled images; use dml, xml or kd with --unlabeled")
        if MODES[self.mode].needs_teacher and not self.teacher:
            raise ValueError(
                f"mode {self.mode} needs a teacher (--teacher: a run directory or a saved model, e.g. from "
                "`xross export`)"
            )
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
        json_schema_extra=_cli(comma=True),
        description="discriminator hidden widths (default: C/8,C/64 as MEAL V2, at least 8 each)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if not self.teacher:
            raise ValueError("distillation needs at least one --teacher (a run directory, RUN@0-1 or a saved model)")
        if self.soft_weight == 0 and self.hard_weight == 0:
            raise ValueError("soft_weight and hard_weight are both 0: nothing would be learned")
        return self


CONFIGS: dict[str, type[RunConfig]] = {"train": TrainConfig, "distill": DistillConfig}


def _read_yaml(path: str | Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_bytes())
    except OSError as e:
        raise XrossError(f"cannot read config {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise XrossError(f"config {path} is not valid YAML: {first_line(e)}") from None


def load_config(path: str | Path) -> TrainConfig | DistillConfig:
    """The config of a run directory's ``config.yaml``, of the class its ``kind`` names (default ``train``)."""
    data = _read_yaml(path)
    kind = data.get("kind", "train") if isinstance(data, dict) else "train"
    if kind not in CONFIGS:
        raise XrossError(f"{path}: field 'kind' is '{kind}'; expected one of {', '.join(CONFIGS)}")
    return CONFIGS[kind].from_dict(data, str(path))  # type: ignore[return-value]


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
    if not isinstance(saved_config, config_class):
        kind = saved_config.kind
        raise XrossError(
            f"cannot resume: '{options['out']}' is a {kind} run; continue it with "
            f"`xross {kind} --resume --out {options['out']}`"
        )
    return config_class.from_dict({**saved_config.model_dump(), **options}, str(path))
