"""Run directories: what a config builds, and a finished (or interrupted) run read back.

A run of the ``cohort`` kind holds a cohort (:func:`load_run`), a ``slim`` run (mutualnet) one
slimmable net (:func:`load_slim`), a ``student`` run (distillation) one student
(:func:`load_student`), whose initial structure and weights it keeps in
``RUN/student-init`` so that it never depends on where the student came from.
``RUN@0-1`` model references (:mod:`surgery.files.refs`) resolve here: the path through the
run's cohort as a standalone :class:`surgery.Pieces`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn

import surgery
from surgery.channels.slim import SlimNet
from surgery.core.errors import SurgeryError
from surgery.core.trust import Kind, resolve
from surgery.core.util import evaluating, first_line
from surgery.files.refs import parse as parse_reference
from surgery.files.refs import register_run_loader
from surgery.models.build import is_code_source
from xross.cohort.grid import Cohort, build_net
from xross.cohort.grow import grow_model, grow_net
from xross.data import EVAL_SPLITS, BatchLoader, ImageTensors, load_split
from xross.errors import XrossError
from xross.run.checkpoint import CheckpointDir
from xross.run.config import DistillConfig, RunConfig, TrainConfig, load_config
from xross.run.distributed import globalise_batchnorm
from xross.run.growing import GrowthEntry, checkpoint_growth
from xross.run.table import require_kind

M = TypeVar("M", bound=nn.Module)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
STUDENT_INIT = "student-init"


def build_cohort(
    config: TrainConfig, device: torch.device, distributed: bool = False, *, trust_code: bool = False
) -> Cohort:
    """The cohort a (resolved) config describes, on ``device``, with seeded initial weights.

    ``trust_code`` lets ``config.nets`` name code outside the trusted packages (see
    :mod:`surgery.core.trust`): pass it for nets you typed, not for a config from elsewhere.
    """
    if config.num_classes is None or config.image_size is None:
        raise XrossError(
            "the config lacks num_classes/image_size; they are filled in from the data when training starts"
        )
    torch.manual_seed(config.seed)
    transform = (lambda net: globalise_batchnorm(net, device)) if (distributed and config.sync_bn) else None
    cohort = Cohort.build(
        config.nets,
        config.per_net_cuts(),
        config.num_classes,
        config.image_size,
        stem=config.stem,
        adapter_batchnorm=config.adapter_batchnorm,
        always_adapt=config.always_adapt,
        transform_net=transform,
        trust_code=trust_code,
        exits=config.exits,
        exit_head=config.exit_head,
    )
    return cohort.to(device)


def load_cohort_weights(cohort: Cohort, run: Path, *, verify: bool = True) -> None:
    """Copy the newest good weights of the train run ``run`` into ``cohort`` (same nets and cuts); exit
    heads the run lacks keep their initial weights."""
    require_kind(run_config(run), "cohort", run, prefix="--init-from ")
    path, state = CheckpointDir(run).load_latest(verify)
    try:
        missing, unexpected = cohort.load_state_dict(state["cohort"], strict=False)
    except RuntimeError as e:
        raise XrossError(
            f"--init-from '{run}': its checkpoint {path.name} does not fit this cohort ({first_line(e, 120)}); "
            "give the same nets and cuts"
        ) from None
    absent = [k for k in missing if not k.startswith("exits.")]
    if absent or unexpected:
        name = (absent or unexpected)[0]
        raise XrossError(
            f"--init-from '{run}': its checkpoint {path.name} does not fit this cohort ('{name}'); "
            "give the same nets and cuts"
        )


def build_slim(
    config: TrainConfig, device: torch.device, distributed: bool = False, *, trust_code: bool = False
) -> SlimNet:
    """The slimmable net a ``mutualnet`` config describes, with seeded initial weights, on ``device``."""
    if config.num_classes is None or config.image_size is None:
        raise XrossError(
            "the config lacks num_classes/image_size; they are filled in from the data when training starts"
        )
    torch.manual_seed(config.seed)
    net = build_net(config.nets[0], config.num_classes, config.stem, trust_code=trust_code)
    if distributed and config.sync_bn:
        net = globalise_batchnorm(net, device)
    resolutions = config.grid()[1]
    for size in resolutions:  # every resolution trained must run, before any step is taken
        try:
            with torch.no_grad(), evaluating(net):
                net(torch.zeros(2, 3, size, size))
        except (RuntimeError, ValueError, AssertionError) as e:  # timm asserts input sizes
            raise XrossError(
                f"resolution {size}: {config.nets[0]} cannot take {size}x{size} inputs ({first_line(e, 120)}); "
                "give --resolutions it accepts"
            ) from None
    example = torch.zeros(2, 3, resolutions[0], resolutions[0])
    try:
        return SlimNet(net, divisor=config.width_divisor, example_input=example).to(device)
    except SurgeryError as e:
        raise XrossError(f"mutualnet cannot slim {config.nets[0]}: {e}") from None


def check_sources(references: list[str], trust_code: bool, what: str) -> None:
    """Refuse, in one line, model references that name code outside the trusted packages (unless ``trust_code``),
    before anything is imported or built."""
    for text in references:
        ref = parse_reference(text)
        if ref.kind == "build" and is_code_source(ref.target):
            resolve(ref.target, kind=Kind.MODEL_SOURCE, trust_code=trust_code, what=what)


def run_config(run: Path) -> TrainConfig | DistillConfig:
    """The config of a run directory (``RUN/config.yaml``), one line if it is not one."""
    if not (run / "config.yaml").is_file():
        raise XrossError(
            f"'{run}' is not a run directory (no config.yaml); make one with `xross train` or `xross distill`"
        )
    return load_config(run / "config.yaml")


def _with_latest_weights(
    run: Path, module: M, key: str, cfg: RunConfig, verify: bool, regrow: Callable[[M, list[GrowthEntry]], M]
) -> M:
    """``module`` with the weights of the run's newest good checkpoint (its ``key`` entry), in eval mode;
    ``regrow(module, growths)`` first rebuilds the structure the checkpoint's growths made."""
    path, state = CheckpointDir(run).load_latest(verify)
    try:
        module = regrow(module, checkpoint_growth(state))
        module.load_state_dict(state[key])
    except SurgeryError as e:
        raise XrossError(f"checkpoint {path}: its growth log does not replay ({first_line(e, 160)})") from None
    except (RuntimeError, KeyError, TypeError) as e:
        raise XrossError(f"checkpoint {path} does not fit the run's {key} ({first_line(e, 160)})") from None
    return module.to(DTYPES[cfg.dtype]).eval()


def load_run(run: Path, *, trust_code: bool = False, verify: bool = True) -> tuple[TrainConfig, Cohort]:
    """A ``train`` run's config and its cohort (eval mode, on the CPU) with its newest good weights."""
    run = Path(run)
    cfg = run_config(run)
    require_kind(cfg, "cohort", run)
    cohort = build_cohort(cast(TrainConfig, cfg), torch.device("cpu"), trust_code=trust_code)

    def regrow(cohort: Cohort, growths: list[GrowthEntry]) -> Cohort:
        for entry in growths:
            for net, steps in entry.steps().items():
                grow_net(cohort, net, steps, cfg.image_size or 0)
        return cohort

    return cast(TrainConfig, cfg), _with_latest_weights(run, cohort, "cohort", cfg, verify, regrow)


def load_slim(run: Path, *, trust_code: bool = False, verify: bool = True) -> tuple[TrainConfig, SlimNet]:
    """A ``mutualnet`` run's config and its slimmable net (eval mode, on the CPU) with its newest good weights."""
    run = Path(run)
    cfg = run_config(run)
    require_kind(cfg, "slim", run)
    slim = build_slim(cast(TrainConfig, cfg), torch.device("cpu"), trust_code=trust_code)
    return cast(TrainConfig, cfg), _with_latest_weights(run, slim, "slim", cfg, verify, lambda m, _: m)


def initial_student(run: Path, *, trust_code: bool = False) -> nn.Module:
    """The student a ``distill`` run started from (``RUN/student-init``)."""
    saved = Path(run) / STUDENT_INIT
    if not (saved / "recipe.json").is_file():
        raise XrossError(f"'{run}' lacks {STUDENT_INIT}/ (the student it started from); the run directory is damaged")
    return surgery.load(saved, trust_code=trust_code)


def load_student(run: Path, *, trust_code: bool = False, verify: bool = True) -> tuple[DistillConfig, nn.Module]:
    """A ``distill`` run's config and its student (eval mode, on the CPU) with its newest good weights."""
    run = Path(run)
    cfg = run_config(run)
    require_kind(cfg, "student", run)
    student = initial_student(run, trust_code=trust_code)

    def regrow(student: nn.Module, growths: list[GrowthEntry]) -> nn.Module:
        size = cfg.image_size or 32
        for entry in growths:
            for steps in entry.steps().values():
                student = grow_model(student, steps, torch.zeros(2, 3, size, size))[0]
        return student

    return cast(DistillConfig, cfg), _with_latest_weights(run, student, "student", cfg, verify, regrow)


@register_run_loader
def run_path(run: Path, path: tuple[int, ...], *, trust_code: bool = False, verify: bool = True) -> surgery.Pieces:
    """One path through the run's cohort (``runs/x1@0-1``) as standalone pieces, with the run's weights."""
    _, cohort = load_run(run, trust_code=trust_code, verify=verify)
    if len(path) != cohort.num_parts or not all(0 <= n < cohort.num_nets for n in path):
        raise XrossError(
            f"'{run}@{'-'.join(map(str, path))}' needs {cohort.num_parts} net indices in 0..{cohort.num_nets - 1}"
        )
    return cohort.export_path(path)


def exit_heads_config(run: Path, **options: Any) -> TrainConfig:
    """The config of a run that trains exit heads on ``run``'s frozen cohort (``xross add-exits``): the
    run's own config with exits on, the cohort initialised from ``run`` and frozen; ``options`` (``out``,
    ``epochs``, ``lr``, exit options...) override it.

    The images held out for calibrating exit thresholds are ``run``'s own holdout, or, if it had none,
    a tenth of its training images: the heads never see them, but the cohort did.
    """
    run = Path(run)
    cfg = run_config(run)
    require_kind(cfg, "cohort", run, fix="; exit heads attach to a cohort's parts")
    if cast(TrainConfig, cfg).exits:
        raise XrossError(f"'{run}' already has exit heads; use it as it is (`xross anytime {run}`)")
    base = cfg.model_dump(exclude={"out", "warmup_epochs", "lr_schedule"})
    base.update(exits=True, init_from=str(run.resolve()), frozen_cohort=True, epochs=3, lr=1e-3)
    if not base["holdout"]:  # the cohort trained on every image: hold out a tenth now (it has seen them)
        base["holdout"] = None
    return TrainConfig.from_dict({**base, **options}, "the options")


def evaluation_split(cfg: RunConfig, eval_subset: int | None = None) -> ImageTensors:
    """A run's evaluation images (``test/``, else ``val/``; ``eval_subset``: a stratified subset, default the
    run's own)."""
    return load_split(cfg.data, EVAL_SPLITS, subset=eval_subset or cfg.eval_subset, image_size=cfg.image_size,
                      cache_dir=cfg.cache_dir, seed=cfg.seed)  # fmt: skip


def evaluation_batches(
    cfg: RunConfig, eval_subset: int | None = None, batch_size: int = 256
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A run's evaluation images as batches in its dtype (see :func:`evaluation_split`)."""
    return as_batches(evaluation_split(cfg, eval_subset), cfg, batch_size)


def as_batches(data: ImageTensors, cfg: RunConfig, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``data`` normalised, in order, as batches in the run's dtype."""
    dtype = DTYPES[cfg.dtype]
    return [(x.to(dtype), y) for x, y in BatchLoader(data, batch_size, train=False).epoch(0)]
