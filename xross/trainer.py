"""The xross training loop: K networks, P parts, one objective, resumable and data-parallel.

>>> from xross.config import TrainConfig
>>> from xross.trainer import Trainer
>>> cfg = TrainConfig(nets=["resnet18", "resnet34"], cuts=["layer2"], mode="xml",
...                   data="../shared/data/cifar10-jpeg.tar.xz", subset=512, epochs=1, out="runs/demo")
>>> result = Trainer(cfg, force=True).fit()                            # doctest: +SKIP

One step (``train_step``): every path the objective needs is computed once through a
prefix tree; each student's loss is formed from its own path, its peers' detached
predictions and its cross paths. With ``schedule="alternate"`` (the research's) each
student's loss reaches only that student's parameters (and the adapters it owns):
gradients flow *through* teacher parts, but teacher parameters receive nothing from
it. With ``schedule="joint"`` the summed loss is back-propagated once into every
part it passes through (cheaper, not the research's update). Then one optimizer step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import surgery
from surgery._util import atomic_write_text, first_line
from surgery.io import versions
from surgery.models import is_code_source
from surgery.refs import parse as parse_reference
from surgery.trust import Kind, resolve
from xross.checkpoint import CheckpointDir
from xross.cohort import Cohort
from xross.config import TrainConfig
from xross.data import Augment, BatchLoader, ImageTensors, derive_seed, load_split
from xross.distributed import (
    DistInfo,
    any_rank,
    average_gradients,
    globalise_batchnorm,
    init_distributed,
    sum_over_ranks,
)
from xross.errors import Interrupted, TrainingDiverged, XrossError
from xross.evaluate import EvalResult, evaluate
from xross.losses import MODES, LossTerms, Mode, make_mode
from xross.metrics import MetricsLog
from xross.optim import lr_at, make_optimizer, set_lr


@dataclasses.dataclass
class Position:
    """Where training stands: ``step`` is the next step of ``epoch``; ``global_step`` counts steps done."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


ADAPTER_OWNERS = {"student": "any", "up": "src", "down": "dst"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_cohort(
    config: TrainConfig, device: torch.device, distributed: bool = False, *, trust_code: bool = False
) -> Cohort:
    """The cohort a (resolved) config describes, on ``device``, with seeded initial weights.

    ``trust_code`` lets ``config.nets`` name code outside the trusted packages (see
    :mod:`surgery.trust`): pass it for nets you typed, not for a config from elsewhere.
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
    )
    return cohort.to(device)


def check_sources(nets: list[str], trust_code: bool) -> None:
    """Refuse, in one line, nets that name code outside the trusted packages (unless ``trust_code``)."""
    for net in nets:
        ref = parse_reference(net)
        if ref.kind == "build" and is_code_source(ref.target):
            resolve(ref.target, kind=Kind.MODEL_SOURCE, trust_code=trust_code, what="the net")


def load_teachers(sources: list[str], device: torch.device, *, trust_code: bool = False) -> list[nn.Module]:
    """KD teachers: directories saved by ``surgery.save`` / ``xross export`` (loaded as files from elsewhere)."""
    teachers = []
    for src in sources:
        if not (Path(src) / "recipe.json").is_file():
            raise XrossError(
                f"teacher '{src}' is not a saved model directory; export one with `xross export` or surgery.save"
            )
        teachers.append(surgery.load(src, trust_code=trust_code).to(device).eval().requires_grad_(False))
    return teachers


class Trainer:
    """Trains a cohort as ``config`` says; ``fit()`` runs to the end (or to a signal).

    ``resume=True`` continues the run in ``config.out`` from its newest loadable
    checkpoint (``verify=False`` skips the checkpoint digest check); ``config`` should be
    the run's own (``TrainConfig.load(out/"config.yaml")``), with at most ``epochs``
    raised to train longer. ``trust_code`` allows nets and teachers that name code
    outside the trusted packages (see :mod:`surgery.trust`); ``trust_nets`` (default:
    as ``trust_code``) does so for the nets alone, e.g. nets the user typed.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        force: bool = False,
        progress: bool = True,
        command: str | None = None,
        dist: DistInfo | None = None,
        trust_code: bool = False,
        trust_nets: bool | None = None,
        verify: bool = True,
    ):
        self.dist = dist or init_distributed(config.device)
        self.device = self.dist.device
        # names from files are refused before anything is built, decoded or deleted
        trust_nets = trust_code if trust_nets is None else trust_nets
        check_sources(config.nets, trust_nets)
        self.teachers = (
            load_teachers(config.teacher, self.device, trust_code=trust_code)
            if MODES[config.mode].needs_teacher
            else []
        )
        self.run_dir = Path(config.out)
        self.progress = progress and self.dist.is_main
        if resume and not (self.run_dir / "config.yaml").is_file():
            raise XrossError(
                f"cannot resume: '{self.run_dir / 'config.yaml'}' does not exist; start the run without --resume"
            )
        if not resume and self.dist.is_main:
            self._prepare_run_dir(force)
        self.dist.barrier()
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        self._check_options(config)
        train, test = self._load_data(config)
        config.num_classes = config.num_classes or len(train.classes)
        config.image_size = config.image_size or int(train.images.shape[-1])
        self.config = config
        self.dtype = DTYPES[config.dtype]
        self.cohort = build_cohort(config, self.device, self.dist.enabled, trust_code=trust_nets).to(self.dtype)
        if config.channels_last:
            self.cohort = self.cohort.to(memory_format=torch.channels_last)
        self.mode: Mode = make_mode(
            config.mode,
            cross=config.cross,
            temperature=config.temperature,
            alpha=config.kd_alpha,
            label_smoothing=config.label_smoothing,
        )
        self.paths = self.mode.paths(self.cohort)
        self.params = list(self.cohort.parameters())
        self.trainables = [self._trainables(i) for i in range(self.cohort.num_nets)]
        self.optimizer = make_optimizer(self.params, config)
        use_fp16 = config.amp == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_fp16)
        augment = Augment()
        kw = {"device": self.device, "seed": config.seed, "rank": self.dist.rank, "world_size": self.dist.world_size}
        self.train_loader = BatchLoader(train, config.batch_size, train=True, augment=augment, **kw)
        self.test_loader = BatchLoader(test, config.batch_size, train=False, augment=augment, **kw)
        self.total_steps = config.epochs * len(self.train_loader)
        self.checkpoints = CheckpointDir(self.run_dir, config.keep_checkpoints)
        if self.dist.is_main:
            self.checkpoints.remove_leftovers()
        self.position = Position()
        self.stop_signal: int | None = None
        self.train_logits: dict[int, torch.Tensor] = {}
        self.metrics = MetricsLog(self.run_dir) if self.dist.is_main else None
        if resume:
            self._restore(verify)
        elif self.dist.is_main:
            self._write_run_files(command)
        if config.compile and self.device.type == "cuda":
            for net in self.cohort.nets:
                for piece in net:
                    piece.compile()

    # --- set-up -------------------------------------------------------------------------------

    def _prepare_run_dir(self, force: bool) -> None:
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not force:
                raise XrossError(
                    f"run directory '{self.run_dir}' is not empty; pass --resume to continue it or "
                    "--force to start over"
                )
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _check_options(self, config: TrainConfig) -> None:
        """Say which options have no effect here (the config validated everything else)."""
        if self.dist.is_main and self.device.type != "cuda":
            for flag, on in (("--amp", config.amp != "off"), ("--compile", config.compile)):
                if on:
                    print(f"note: {flag} works on CUDA only; ignored on {self.device.type}", file=sys.stderr)

    def _load_data(self, config: TrainConfig) -> tuple[ImageTensors, ImageTensors]:
        def load() -> tuple[ImageTensors, ImageTensors]:
            kw = {
                "image_size": config.image_size,
                "cache_dir": config.cache_dir,
                "seed": config.seed,
                "progress": self.progress,
            }
            return load_split(config.data, "train", subset=config.subset, **kw), load_split(
                config.data, "test", subset=config.eval_subset, **kw
            )

        if not self.dist.enabled:
            return load()
        if self.dist.is_main:  # decode once; the other ranks read the cache
            data = load()
        self.dist.barrier()
        if not self.dist.is_main:
            data = load()
        return data

    def _trainables(self, i: int) -> list[nn.Parameter]:
        """Parameters student i's loss updates: its net and the adapters it owns."""
        return self.cohort.net_parameters(i) + self.cohort.adapter_parameters(
            i, ADAPTER_OWNERS[self.config.adapter_update]
        )

    def _write_run_files(self, command: str | None) -> None:
        self.config.save(self.run_dir / "config.yaml")
        atomic_write_text(self.run_dir / "versions.json", json.dumps(versions(), indent=1) + "\n")
        atomic_write_text(self.run_dir / "command.txt", (command or " ".join(sys.argv)) + "\n")

    # --- one step -----------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.amp == "off" or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.config.amp == "bf16" else torch.float16)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor | None:
        """KD target as logits whose softmax at temperature T is the teachers' mean softmax at T."""
        if not self.teachers:
            return None
        t = self.config.temperature
        probs = torch.stack([m(images).float().div(t).softmax(1) for m in self.teachers]).mean(0)
        return probs.clamp_min(1e-12).log() * t

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, students: list[int] | None = None
    ) -> dict[int, LossTerms]:
        """One optimizer step on a batch; only ``students`` (default all) learn from it."""
        students = list(range(self.cohort.num_nets)) if students is None else students
        images = images.to(self.dtype)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.cohort.forward_paths(images, self.paths, shared=self.config.shared_prefixes)
            target = self.teacher_logits(images)
            losses = {i: self.mode.loss(i, logits, labels, self.cohort, target) for i in students}
        self._check_finite(losses)
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.schedule == "joint":
            self.scaler.scale(torch.stack([loss.total for loss in losses.values()]).sum()).backward()
        else:
            for n, (i, loss) in enumerate(losses.items()):
                params = self.trainables[i]
                grads = torch.autograd.grad(
                    self.scaler.scale(loss.total), params, retain_graph=n < len(losses) - 1, allow_unused=True
                )
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
        average_gradients(self.params, self.dist)
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.train_logits = {i: logits[self.cohort.own_path(i)].detach() for i in students}
        return losses

    def _check_finite(self, losses: dict[int, LossTerms]) -> None:
        values = torch.stack([v.detach().double() for loss in losses.values() for v in loss.terms.values()])
        if bool(torch.isfinite(values).all()):
            return
        for i, loss in losses.items():
            for name, v in loss.terms.items():
                if not bool(torch.isfinite(v)):
                    last = self.checkpoints.latest()
                    p = self.position
                    raise TrainingDiverged(
                        f"loss term '{name}' of net {i} ({self.config.nets[i]}) is "
                        f"{float(v.detach())} at epoch {p.epoch + 1} step {p.step + 1} "
                        f"(global step {p.global_step + 1}); stopped without saving; the last good checkpoint is "
                        f"{last if last else 'none (no epoch finished yet)'}"
                    )

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> EvalResult:
        """Train to ``config.epochs``, checkpointing every epoch; then evaluate every path."""
        with self._signals(), self._progress_bar() as bar:
            while self.position.epoch < self.config.epochs:
                self._train_epoch(bar)
                self.position = Position(self.position.epoch + 1, 0, self.position.global_step)
                self._end_of_epoch()
        result = self.evaluate()
        if self.dist.is_main:
            result.save(self.run_dir / "eval.json")
            if self.metrics:
                self.metrics.close()
        return result

    def _train_epoch(self, bar: Any) -> None:
        cfg, pos = self.config, self.position
        steps = len(self.train_loader)
        task = (
            bar.add_task(f"epoch {pos.epoch + 1}/{cfg.epochs}", total=steps, completed=pos.step, stats="")
            if bar
            else None
        )
        seen, t0 = 0, time.perf_counter()
        for images, labels in self.train_loader.epoch(pos.epoch, start_step=pos.step):
            torch.manual_seed(derive_seed("step", cfg.seed, pos.global_step))  # dropout & co. resume exactly
            set_lr(
                self.optimizer,
                lr_at(cfg.lr_schedule, cfg.lr, pos.global_step, self.total_steps, steps, cfg.warmup_epochs, cfg),
            )
            losses = self.train_step(images, labels)
            pos.step += 1
            pos.global_step += 1
            seen += len(labels) * self.dist.world_size
            if pos.global_step % cfg.log_every == 0 or pos.step == steps:
                self._log_step(losses, labels, seen / (time.perf_counter() - t0), bar, task)
            if any_rank(self.stop_signal is not None, self.dist):
                path = self._save_checkpoint()
                name = signal.Signals(self.stop_signal or signal.SIGINT).name
                raise Interrupted(
                    f"{name} at epoch {pos.epoch + 1} step {pos.step}: saved {path}; continue with "
                    f"`xross train --resume --out {self.run_dir}`"
                )
        if bar:
            bar.update(task, completed=steps)

    def _log_step(
        self, losses: dict[int, LossTerms], labels: torch.Tensor, images_per_s: float, bar: Any, task: Any
    ) -> None:
        pos = self.position
        row: dict[str, Any] = {
            "global_step": pos.global_step,
            "epoch": pos.epoch + 1,
            "step": pos.step,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        for i, loss in losses.items():
            row[f"loss{i}"] = float(loss.total.detach())
            row[f"acc{i}"] = 100.0 * float((self.train_logits[i].argmax(1) == labels).float().mean())
        if self.metrics:
            self.metrics.write("steps", row, pos.global_step)
            self.metrics.write(
                "throughput", {"global_step": pos.global_step, "images_per_s": round(images_per_s, 1)}, pos.global_step
            )
        if bar:
            stats = "  ".join(f"loss{i} {row[f'loss{i}']:.3f} acc{i} {row[f'acc{i}']:.1f}%" for i in losses)
            bar.update(task, completed=pos.step, stats=f"{stats}  {images_per_s:.0f} img/s")

    def _end_of_epoch(self) -> None:
        cfg, pos = self.config, self.position
        row: dict[str, Any] = {"epoch": pos.epoch, "global_step": pos.global_step}
        if cfg.eval_every and pos.epoch % cfg.eval_every == 0:
            own = [self.cohort.own_path(i) for i in range(self.cohort.num_nets)]
            result = self.evaluate(own)
            row.update({f"top1_net{i}": result.own(i, self.cohort.num_parts).top1 for i in range(self.cohort.num_nets)})
            row["top1_ensemble"] = result.ensembles["nets"].top1
        if self.metrics:
            self.metrics.write("epochs", row, pos.global_step)
        self._save_checkpoint()

    def evaluate(self, paths: list[tuple[int, ...]] | None = None) -> EvalResult:
        """Top-1/top-5 of ``paths`` (default all) on the evaluation split; each rank scores its part of every batch."""
        batches = ((x.to(self.dtype), y) for x, y in self.test_loader.epoch(0))
        return evaluate(
            self.cohort,
            batches,
            self.config.image_size,
            paths,
            reduce=functools.partial(sum_over_ranks, info=self.dist),
        )

    # --- checkpoints and signals ----------------------------------------------------------------

    def _save_checkpoint(self) -> Path | None:
        path = None
        if self.dist.is_main:
            state = {
                "cohort": self.cohort.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "position": dataclasses.asdict(self.position),
                "rng": {
                    "torch": torch.get_rng_state(),
                    **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
                },
            }
            path = self.checkpoints.save(state, self.position.global_step)
        self.dist.barrier()
        return path

    def _restore(self, verify: bool = True) -> None:
        path, state = self.checkpoints.load_latest(verify)
        try:
            self.cohort.load_state_dict(state["cohort"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.position = Position(**state["position"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise XrossError(f"checkpoint {path} does not fit this run ({first_line(e, 160)})") from None
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.metrics:
            self.metrics.truncate("steps", "global_step", self.position.global_step)
            self.metrics.truncate("throughput", "global_step", self.position.global_step)
            self.metrics.truncate("epochs", "epoch", self.position.epoch)
        if self.dist.is_main:
            with open(self.run_dir / "command.txt", "a") as f:
                f.write(" ".join(sys.argv) + f"  # resumed from {path.name}\n")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def request_stop(signum: int, frame: Any) -> None:
            self.stop_signal = signum

        handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[Any]:
        if not self.progress:
            yield None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
        )
        with Progress(*columns, transient=False) as bar:
            yield bar
