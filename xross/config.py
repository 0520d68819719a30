"""The complete description of a training run; saved as ``config.yaml`` in the run directory.

``xross train --config runs/x1/config.yaml`` repeats a run exactly.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from surgery._util import first_line
from xross.errors import XrossError
from surgery.errors import did_you_mean


@dataclasses.dataclass
class TrainConfig:
    # cohort
    nets: list[str] = dataclasses.field(default_factory=lambda: ["resnet34", "resnet18"])
    cuts: list[str] = dataclasses.field(default_factory=lambda: ["layer2"])  # "a" for all nets, or "a,b" per net
    stem: str = "imagenet"  # or "cifar" (3x3 stride-1 conv1, no maxpool)
    adapter_batchnorm: bool = False
    always_adapt: bool = False
    # objective
    mode: str = "xml"  # independent | kd | dml | xml
    schedule: str = "alternate"  # alternate | joint
    cross: str = "all"  # all | single (xml)
    shared_prefixes: bool = True  # compute each path prefix once per step (False: every path from scratch)
    adapter_update: str = "student"  # student | all: which students' losses train the adapters (alternate)
    temperature: float = 4.0  # kd
    kd_alpha: float = 0.5  # kd
    teacher: list[str] = dataclasses.field(default_factory=list)  # kd: saved model dirs or names (+ weights)
    label_smoothing: float = 0.0
    # data
    data: str = "cifar10"
    subset: int | None = None
    eval_subset: int | None = None
    image_size: int | None = None
    cache_dir: str | None = None
    num_classes: int | None = None  # default: from the data
    # optimisation
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | step
    warmup_epochs: float = 0.0
    step_epochs: int = 30
    step_gamma: float = 0.1
    grad_clip: float | None = None
    # engine
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | bf16 | fp16 (CUDA only)
    dtype: str = "float32"  # float32 | float64 (exact comparisons, debugging)
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = True  # global BatchNorm statistics when distributed
    threads: int | None = None
    eval_every: int = 1  # epochs; 0: only at the end
    log_every: int = 10  # steps
    keep_checkpoints: int = 2
    out: str = "runs/xross"

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise XrossError(f"unknown config key '{unknown[0]}' ({did_you_mean(unknown[0], known)})")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise XrossError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise XrossError(f"config {path} is not valid YAML: {first_line(e)}") from None
        if not isinstance(data, dict):
            raise XrossError(f"config {path} must be a mapping of option: value")
        return cls.from_dict(data)

    def per_net_cuts(self) -> list[list[str]]:
        """Cut names per net from ``cuts`` entries like ``"layer2"`` or ``"layer2,features.4"``."""
        per_net: list[list[str]] = [[] for _ in self.nets]
        for entry in self.cuts:
            names = [n.strip() for n in entry.split(",")]
            if len(names) == 1:
                names = names * len(self.nets)
            if len(names) != len(self.nets):
                raise XrossError(f"cut '{entry}' names {len(names)} points but there are {len(self.nets)} nets; give one name, or one per net")
            for k, n in enumerate(names):
                per_net[k].append(n)
        return per_net
