"""What every xross run's config has: data, optimisation and engine (:class:`RunConfig`), the teacher options
of ``kd`` and ``distill`` (:class:`TeacherOptions`), and the checks they share; :mod:`xross.run.config` builds
:class:`~xross.run.config.TrainConfig` and :class:`~xross.run.config.DistillConfig` on them.

>>> RunConfig(epochs=3).epochs
3
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, field_validator, model_validator

from surgery.core.errors import SurgeryError
from surgery.core.schema import DEFAULT_FIX, FileModel, Float, parse
from surgery.core.util import atomic_write_text, first_line
from xross.data.sources import TEXT_PREFIX
from xross.errors import XrossError
from xross.run.table import unused_option, uses

StemName = Literal["imagenet", "cifar"]
OptimizerName = Literal["sgd", "adam", "adamw"]
LrScheduleName = Literal["constant", "cosine", "step"]
AmpName = Literal["off", "bf16", "fp16"]
DtypeName = Literal["float32", "float64"]
GrowOptimizerName = Literal["carry", "reset"]
GrowInitName = Literal["copy", "random"]
TaskName = Literal["classify", "causal_lm"]
ParallelName = Literal["ddp", "fsdp", "manual"]
GROWING = uses(kinds=("cohort", "student"))  # the fields of growth during training (xross.run.growing)

# CLI hints carried by fields: the option name when it differs, how a list is given
CLI = "cli"


def cli_hint(name: str | None = None, *, comma: bool = False) -> dict[str, Any]:
    return {CLI: {"name": name, "comma": comma}}


class RunConfig(FileModel):
    """What every run has: its data, optimisation and engine; loading, saving and validation."""

    format_version: Literal[1] = Field(1, description="version of this file's layout")
    stem: StemName = Field(
        "imagenet", description="imagenet, or cifar (3x3 stride-1 conv1, no maxpool; ResNets built by name)"
    )
    # data
    data: str = Field(
        "cifar10",
        description="cifar10 | cifar100 | ImageFolder (train/; test/ or val/) | a .tar(.gz/.xz) | "
        "text:DIR (--task causal_lm: *.txt, *.py, *.md under DIR)",
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
    # growth during training
    grow: list[str] = Field(
        default_factory=list,
        json_schema_extra=GROWING,
        description="grow during training, WHEN:OP:SITES[:ARG=VALUE,...], e.g. 0.25:net2wider:all:factor=2 or "
        "epoch=2:net2deeper:stages (repeat for several; see xross.run.growing)",
    )
    grow_optimizer: GrowOptimizerName = Field(
        "carry",
        json_schema_extra=GROWING,
        description="at a growth: carry each copy the optimiser state of what it copies (scaled), or reset it",
    )
    grow_warmup: NonNegativeInt = Field(
        0, json_schema_extra=GROWING, description="steps of linear learning-rate warm-up after each growth"
    )
    grow_kd: str | None = Field(
        None,
        json_schema_extra=GROWING,
        description="T:ALPHA:STEPS: for STEPS steps after a growth, each grown net's loss is (1-ALPHA) x its own "
        "plus ALPHA x T^2 KL from the net as it was before the growth (e.g. 2:0.5:100)",
    )
    grow_init: GrowInitName = Field(
        "copy",
        json_schema_extra=GROWING,
        description="new units: copy (function-preserving) or random (a fresh init; only what stays keeps its weights)",
    )
    # engine
    seed: NonNegativeInt = Field(0, description="random seed (weights, data order, augmentation)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda | cuda:N")
    amp: AmpName = Field("off", description="mixed precision (CUDA only)")
    dtype: DtypeName = Field("float32", description="float64 for exact comparisons and debugging")
    channels_last: bool = Field(False, description="channels-last memory format (CUDA)")
    compile: bool = Field(False, description="torch.compile the trained networks (CUDA)")
    sync_bn: bool = Field(True, description="global BatchNorm statistics when data-parallel")
    parallel: ParallelName = Field(
        "ddp",
        description="under torchrun: ddp (DistributedDataParallel), fsdp (FSDP2: parameters, gradients and "
        "optimiser state sharded; cohorts), manual (one flat all-reduce); see xross.run.parallel",
    )
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

    @field_validator("grow")
    @classmethod
    def _grow_items(cls, value: list[str]) -> list[str]:
        from xross.run.growing import parse_item

        for item in value:
            parse_item(item)
        return value

    @field_validator("grow_kd")
    @classmethod
    def _grow_kd(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = value.split(":")
        try:
            t, alpha, steps = float(parts[0]), float(parts[1]), int(parts[2])
            ok = len(parts) == 3 and t > 0 and 0 <= alpha <= 1 and steps > 0
        except (ValueError, IndexError):
            ok = False
        if not ok:
            raise ValueError(f"'{value}' is T:ALPHA:STEPS (T > 0, ALPHA in [0, 1], STEPS >= 1), e.g. 2:0.5:100")
        return value

    def grow_kd_terms(self) -> tuple[float, float, int] | None:
        """``grow_kd`` as (temperature, alpha, steps), or None."""
        if self.grow_kd is None:
            return None
        t, alpha, steps = self.grow_kd.split(":")
        return float(t), float(alpha), int(steps)

    def refuse_growth_options_without_growth(self) -> None:
        """The grow_* options change how a growth is done: without --grow they would do nothing."""
        if self.grow:
            return
        for name in ("grow_optimizer", "grow_warmup", "grow_init", "grow_kd"):
            if getattr(self, name) != type(self).model_fields[name].default:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} applies with --grow only; add a --grow schedule or drop {flag}")

    @property
    def causal_lm(self) -> bool:
        """Whether the run trains language models (only a config with a ``task`` can say so)."""
        return False

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
        return cls.from_dict(read_yaml(path), str(path))


class TeacherOptions(FileModel):
    """Teachers of ``kd`` training and of distillation: references, which paths of a run, weights."""

    teacher: list[str] = Field(
        default_factory=list,
        json_schema_extra=uses("kd", "distill"),
        description="teacher: a run directory, RUN@0-1, a saved model or pieces directory, or a model reference "
        "with weights, e.g. 'resnet18(weights=\"t.safetensors\")' (repeat for an ensemble)",
    )
    teacher_paths: str = Field(
        "full",
        json_schema_extra=uses("kd", "distill"),
        description="which paths of a run-directory teacher: all (every stitched path), full (its K nets), "
        "or a list like 0-1,1-0",
    )
    teacher_weights: list[Float] | None = Field(
        None,
        json_schema_extra={**uses("kd", "distill"), **cli_hint(comma=True)},
        description="weight of each teacher in the ensemble (default equal)",
    )

    @field_validator("teacher_paths")
    @classmethod
    def _paths_list(cls, value: str) -> str:
        if not re.fullmatch(r"all|full|\d+(-\d+)+(,\d+(-\d+)+)*", value):
            raise ValueError("should be all, full or a list of paths like 0-1,1-0")
        return value


LM = uses("independent", "dml", "xml")  # the methods that train causal language models (task causal_lm)
# the options of image classification that a causal_lm run cannot use, and why
CLASSIFY_ONLY = {
    "stem": "it changes a ResNet's image stem",
    "subset": "it keeps a stratified subset of images",
    "eval_subset": "it keeps a stratified subset of images",
    "image_size": "it resizes images (a window's length is --seq-len)",
    "num_classes": "the outputs are the nets' vocabulary",
    "augment": "it crops and flips images",
    "holdout": "it holds out images to calibrate exits",
    "labeled_fraction": "text windows have no labels to drop",
    "unlabeled": "it adds a folder of images",
    "cka_images": "it compares image features",
    "exits": "exit heads pool image features",
    "exit_head": "exit heads pool image features",
    "exit_weights": "exit heads pool image features",
    "frozen_cohort": "it trains exit heads only",
    "channels_last": "it is a memory format of images",
}
LM_ONLY = ("seq_len", "tokenizer", "eval_fraction")


class TaskOptions(FileModel):
    """What a run learns: image classification (the default) or causal language modelling on text files."""

    task: TaskName = Field(
        "classify",
        json_schema_extra=LM,
        description="classify (images) or causal_lm (next-token prediction on --data text:DIR)",
    )
    seq_len: PositiveInt = Field(128, json_schema_extra=LM, description="causal_lm: tokens a training window predicts")
    tokenizer: str | None = Field(
        None,
        json_schema_extra=LM,
        description="causal_lm: hf:DIR, a tokenizer saved with save_pretrained (default: bytes, vocabulary 256)",
    )
    eval_fraction: Float = Field(
        0.1, gt=0, lt=1, json_schema_extra=LM, description="causal_lm: the fraction of windows held out to evaluate"
    )

    @property
    def causal_lm(self) -> bool:
        """Whether the run trains language models: the one place that says which task a run is."""
        return self.task == "causal_lm"

    @field_validator("tokenizer")
    @classmethod
    def _local_tokenizer(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("hf:") or len(value) == 3):
            raise ValueError(
                f"'{value}' is not hf:DIR; give a tokenizer directory written by save_pretrained (never a download)"
            )
        return value

    def refuse_options_of_other_task(self) -> None:
        """One line for an option the run's task cannot use (set to other than its default)."""
        fields = type(self).model_fields
        if not self.causal_lm:
            for name in LM_ONLY:
                if getattr(self, name) != fields[name].get_default(call_default_factory=True):
                    raise ValueError(f"{name} applies to --task causal_lm only; add --task causal_lm or drop it")
            if str(getattr(self, "data", "")).startswith(TEXT_PREFIX):
                raise ValueError("--data text:DIR is text: add --task causal_lm, or give images")
            return
        for name, why in CLASSIFY_ONLY.items():
            if name in fields and getattr(self, name) != fields[name].get_default(call_default_factory=True):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} does not apply to --task causal_lm ({why}): drop {flag}")
        if not str(getattr(self, "data", "")).startswith(TEXT_PREFIX):
            raise ValueError(f"--task causal_lm reads text files: give --data {TEXT_PREFIX}DIR")
        grow = getattr(self, "grow", [])
        if len(grow) > 1 and (
            getattr(self, "grow_optimizer", "") == "carry" or getattr(self, "grow_init", "") == "random"
        ):
            raise ValueError(
                "growth cannot yet trace the lineage (--grow-optimizer carry, --grow-init random) of a decoder grown "
                "once (a graph): grow once, or give --grow-optimizer reset --grow-init copy"
            )


def refuse_unused_options(config: RunConfig) -> None:
    """Refuse (one line) an option set for a method that does not use it (see :func:`xross.run.table.uses`)."""
    message = unused_option(config)
    if message is not None:
        raise ValueError(message)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of a config file; one line if it cannot be read or parsed."""
    try:
        return yaml.safe_load(Path(path).read_bytes())
    except OSError as e:
        raise XrossError(f"cannot read config {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise XrossError(f"config {path} is not valid YAML: {first_line(e)}") from None
