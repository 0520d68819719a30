"""What every xross run does around its training step: the run directory, data, optimiser,
checkpoints, resumption, signals, progress and metrics.

A run is a :class:`RunEngine` subclass that says what it trains (``build``), which
parameters the optimiser updates (``param_groups``), one step (``step``), what to
log, what to checkpoint and how to evaluate. Each method of the table (:mod:`xross.run.table`) names
its engine: :class:`xross.methods.trainer.Trainer` (a cohort), :class:`xross.methods.mutualnet.MutualNetTrainer`
(one slimmable net), :class:`xross.methods.distiller.Distiller` (one student). The loop:

    for epoch: for batch: seed from the global step; set the learning rate; step; log;
               stop cleanly (checkpoint, one line) on SIGINT/SIGTERM
               checkpoint; evaluate every ``eval_every`` epochs
    evaluate; write eval.json

Learning rates and per-step seeds are pure functions of the global step, and the
checkpoint holds the models, optimiser, scaler, position and RNG state, so an
interrupted run resumed with ``--resume`` continues bit-identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from surgery.core.errors import SurgeryError, UserError
from surgery.core.util import atomic_write_text, first_line
from surgery.files.io import versions
from xross.data import Augment, ImageTensors, derive_seed
from xross.errors import Interrupted, TrainingDiverged, XrossError
from xross.run.checkpoint import CheckpointDir
from xross.run.config import DistillConfig, RunConfig, TrainConfig
from xross.run.data import load_run_data
from xross.run.directory import DTYPES
from xross.run.distributed import DistInfo, any_rank, init_distributed
from xross.run.evaluate import EvalResult
from xross.run.grower import GrowthDuringTraining
from xross.run.growing import checkpoint_growth, write_log
from xross.run.metrics import MetricsLog
from xross.run.optim import ParamGroup, lr_at, make_optimizer, set_lr
from xross.run.parallel import make_engine, refuse_engine
from xross.run.teachers import Teachers, load_teachers


@dataclasses.dataclass
class Position:
    """Where training stands: ``step`` is the next step of ``epoch``; ``global_step`` counts steps done;
    ``train_flops`` the training FLOPs spent so far (3x the forward FLOPs of what trains, plus the forward
    FLOPs of fixed teachers, per image)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    train_flops: int = 0


class RunEngine(GrowthDuringTraining):
    """The run machinery; subclasses fill in the hooks below the ``--- hooks`` line.

    ``resume=True`` continues the run in ``config.out`` from its newest loadable checkpoint
    (``verify=False`` skips the digest check); ``config`` should then be the run's own, with
    at most ``epochs`` raised (:func:`xross.run.config.config_from_options` enforces it). ``trust_code``
    allows names read from files (run configs, saved directories) that run code outside the
    trusted packages (see :mod:`surgery.core.trust`); ``trust_typed`` (default: as ``trust_code``)
    does so for the model references of the config alone, e.g. ones the user typed.
    """

    command_name = "train"  # the xross sub-command that resumes this kind of run
    parallel_engines: tuple[str, ...] = ("ddp", "manual")  # the --parallel engines that can run its step

    def __init__(
        self,
        config: RunConfig,
        *,
        resume: bool = False,
        force: bool = False,
        progress: bool = True,
        command: str | None = None,
        dist: DistInfo | None = None,
        trust_code: bool = False,
        trust_typed: bool | None = None,
        verify: bool = True,
    ):
        self.trust_code = trust_code
        self.teachers: Teachers | None = None
        self.trust_typed = trust_code if trust_typed is None else trust_typed
        self.dist = dist or init_distributed(config.device)
        self.device = self.dist.device
        self.dtype = DTYPES[config.dtype]
        self.verify = verify
        self.check_inputs(config)  # names from files are refused before anything is built, decoded or deleted
        self.run_dir = Path(config.out)
        self.progress = progress and self.dist.is_main
        if resume and not (self.run_dir / "config.yaml").is_file():
            raise XrossError(
                f"cannot resume: '{self.run_dir / 'config.yaml'}' does not exist; start the run without --resume"
            )
        if not resume and self.dist.is_main:
            self._prepare_run_dir(force)
        self.dist.barrier()
        try:
            self._set_up(config, resume, command)
        except UserError:
            if not resume and self.dist.is_main:  # a run that never started leaves no directory behind
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _set_up(self, config: RunConfig, resume: bool, command: str | None) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        self._check_options(config, resume)
        self.parallel = make_engine(config.parallel, self.dist)  # how the ranks share a step (xross.run.parallel)
        data = load_run_data(config, self.dist, self.progress)
        train, test, loader, self.vocab = data.train, data.test, data.loader, data.vocab
        if self.vocab is None:  # images: what the run's method trains on (a subclass may take a part)
            train = self.training_images(train, config)
        self.eval_split = test.split  # test/, else val/ (held-out windows of text): in eval.json and the tables
        self.config = config
        self.build(resume)
        if self.dist.enabled and self.dist.is_main:
            print(self.parallel.describe(), file=sys.stderr)
        groups = self.param_groups()
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = make_optimizer(groups, config)
        use_fp16 = config.amp == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_fp16)
        augment = training_augment(config)
        kw: dict[str, Any] = {
            "device": self.device,
            "seed": config.seed,
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
        }
        self.train_loader = loader(train, config.batch_size, train=True, augment=augment, **kw)
        self.test_loader = loader(test, config.batch_size, train=False, augment=augment, **kw)
        self.total_steps = config.epochs * len(self.train_loader)
        self._start_growth()
        self.checkpoints = CheckpointDir(self.run_dir, config.keep_checkpoints)
        if self.dist.is_main:
            self.checkpoints.remove_leftovers()
        self.position = Position()
        self.stop_signal: int | None = None
        self.metrics = MetricsLog(self.run_dir) if self.dist.is_main else None
        if resume:
            self._restore(self.verify)
        elif self.dist.is_main:
            self._write_run_files(command)
        if config.compile and self.device.type == "cuda":
            self.compile()

    # --- hooks ----------------------------------------------------------------------------------

    def check_inputs(self, config: RunConfig) -> None:
        """Refuse bad or untrusted inputs before the run directory is touched."""

    def build(self, resume: bool) -> None:
        """Build what the run trains (``self.config`` is resolved: classes and image size known)."""
        raise NotImplementedError

    def param_groups(self) -> list[ParamGroup]:
        """The optimiser's parameter groups; a group's ``lr_scale`` multiplies the scheduled rate."""
        raise NotImplementedError

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a batch; returns the values to log (a step's metrics row)."""
        raise NotImplementedError

    def model_state(self) -> dict[str, Any]:
        """What of the models a checkpoint holds (the optimiser, scaler, position and RNG are added)."""
        raise NotImplementedError

    def load_model_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def training_images(self, train: ImageTensors, config: RunConfig) -> ImageTensors:
        """The images the run trains on, from the training split (after the holdout); as they are by default."""
        return train

    def epoch_metrics(self) -> dict[str, float]:
        """Metrics of an ``eval_every`` evaluation at the end of an epoch."""
        return {}

    def evaluate(self) -> EvalResult:
        """The final evaluation, saved as ``eval.json``."""
        raise NotImplementedError

    def progress_text(self, row: dict[str, float]) -> str:
        return "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("loss"))

    def compile(self) -> None:
        """``torch.compile`` the trained modules (CUDA only)."""

    # --- helpers for subclasses -----------------------------------------------------------------

    def load_teachers(self, config: TrainConfig | DistillConfig) -> None:
        """``self.teachers`` and ``self.teacher_weights`` from the config's teacher options (see xross.run.teachers)."""
        self.teachers, self.teacher_weights = load_teachers(
            config.teacher,
            config.teacher_paths,
            config.teacher_weights,
            device=self.device,
            dtype=config.dtype,
            trust_code=self.trust_code,
            verify=self.verify,
        )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.amp == "off" or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.config.amp == "bf16" else torch.float16)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.causal_lm:
            return images  # token ids
        images = images.to(self.dtype)
        return images.contiguous(memory_format=torch.channels_last) if self.config.channels_last else images

    def check_finite(self, terms: dict[str, torch.Tensor], owner: str = "") -> None:
        """Stop (without saving) at the first non-finite term, naming it, its ``owner`` and the last good checkpoint;
        under torchrun every rank stops when one does (the others would wait for it in the gradients' reduction)."""
        values = torch.stack([v.detach().double().reshape(()) for v in terms.values()])
        if not any_rank(not bool(torch.isfinite(values).all()), self.dist):
            return
        name, v = next(((n, v) for n, v in terms.items() if not bool(torch.isfinite(v))), ("", None))
        last, p = self.checkpoints.latest(), self.position
        what = (
            f"loss term '{name}'{owner} is {float(v.detach())}"
            if v is not None
            else f"a loss term{owner} of another rank is not finite"
        )
        raise TrainingDiverged(
            f"{what} at epoch {p.epoch + 1} step {p.step + 1} "
            f"(global step {p.global_step + 1}); stopped without saving; the last good checkpoint is "
            f"{last if last else 'none (no epoch finished yet)'}"
        )

    def backward(self, loss: torch.Tensor, params: list[torch.nn.Parameter], retain_graph: bool = False) -> None:
        """Accumulate the gradient of ``loss`` (scaled for AMP) into ``params`` alone, as the run's engine does."""
        self.parallel.backward(self.scaler.scale(loss), params, retain_graph)

    def optimizer_step(self) -> None:
        """Finish the gradients' reduction over ranks, clip, step (through the AMP scaler)."""
        self.parallel.reduce(self.params)
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.config.causal_lm:
            return self.test_loader.epoch(0)  # token ids as they are
        return ((x.to(self.dtype), y) for x, y in self.test_loader.epoch(0))

    # --- set-up ---------------------------------------------------------------------------------

    def _prepare_run_dir(self, force: bool) -> None:
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not force:
                raise XrossError(
                    f"run directory '{self.run_dir}' is not empty; pass --resume to continue it or "
                    "--force to start over"
                )
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _check_options(self, config: RunConfig, resume: bool = False) -> None:
        """Refuse the engines this run cannot use; say which options have no effect here (the config validated
        everything else)."""
        refuse_engine(config, self.parallel_engines, self.dist.enabled or resume)
        if self.dist.is_main and self.device.type != "cuda":
            for flag, on in (("--amp", config.amp != "off"), ("--compile", config.compile)):
                if on:
                    print(f"note: {flag} works on CUDA only; ignored on {self.device.type}", file=sys.stderr)

    def _write_run_files(self, command: str | None) -> None:
        self.config.save(self.run_dir / "config.yaml")
        atomic_write_text(self.run_dir / "versions.json", json.dumps(versions(), indent=1) + "\n")
        atomic_write_text(self.run_dir / "command.txt", (command or " ".join(sys.argv)) + "\n")

    # --- the loop -------------------------------------------------------------------------------

    def fit(self) -> EvalResult:
        """Train to ``config.epochs``, checkpointing every epoch; then evaluate and write ``eval.json``."""
        with self._signals(), self._progress_bar() as bar:
            while self.position.epoch < self.config.epochs:
                self._train_epoch(bar)
                self.position = dataclasses.replace(self.position, epoch=self.position.epoch + 1, step=0)
                self._end_of_epoch()
        result = self.evaluate().model_copy(update={"split": self.eval_split})
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
            self._grow_if_due(images, labels)
            torch.manual_seed(derive_seed("step", cfg.seed, pos.global_step))  # dropout & co. resume exactly
            rate = lr_at(cfg.lr_schedule, cfg.lr, pos.global_step, self.total_steps, steps, cfg.warmup_epochs, cfg)
            set_lr(self.optimizer, rate * self._growth_warmup(pos.global_step))
            row = self.step(images, labels)
            pos.step += 1
            pos.global_step += 1
            pos.train_flops += self.flops_per_image * len(labels) * self.dist.world_size
            seen += len(labels) * self.dist.world_size
            grew, self._growth_row = self._growth_row, {}
            if pos.global_step % cfg.log_every == 0 or pos.step == steps or grew:
                self._log_step({**row, **grew}, seen / (time.perf_counter() - t0), bar, task)
            if any_rank(self.stop_signal is not None, self.dist):
                path = self._save_checkpoint()
                name = signal.Signals(self.stop_signal or signal.SIGINT).name
                raise Interrupted(
                    f"{name} at epoch {pos.epoch + 1} step {pos.step}: saved {path}; continue with "
                    f"`xross {self.command_name} --resume --out {self.run_dir}`"
                )
        if bar:
            bar.update(task, completed=steps)

    def _log_step(self, values: dict[str, float], images_per_s: float, bar: Any, task: Any) -> None:
        pos = self.position
        row: dict[str, Any] = {
            "global_step": pos.global_step,
            "epoch": pos.epoch + 1,
            "step": pos.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_flops": pos.train_flops,
            **values,
        }
        if self.metrics:
            self.metrics.write("steps", row, pos.global_step)
            self.metrics.write(
                "throughput", {"global_step": pos.global_step, "images_per_s": round(images_per_s, 1)}, pos.global_step
            )
        if bar:
            bar.update(task, completed=pos.step, stats=f"{self.progress_text(values)}  {images_per_s:.0f} img/s")

    def _end_of_epoch(self) -> None:
        cfg, pos = self.config, self.position
        row: dict[str, Any] = {"epoch": pos.epoch, "global_step": pos.global_step, "train_flops": pos.train_flops}
        if cfg.eval_every and pos.epoch % cfg.eval_every == 0:
            row.update(self.epoch_metrics())
        if self.metrics:
            self.metrics.write("epochs", row, pos.global_step)
        self._save_checkpoint()

    # --- checkpoints and signals ----------------------------------------------------------------

    def _save_checkpoint(self) -> Path | None:
        path = None
        models, optimizer = self.model_state(), self.parallel.optimizer_state(self.optimizer)  # fsdp: gathered
        if self.dist.is_main:
            state = {
                **models,
                "optimizer": optimizer,
                "scaler": self.scaler.state_dict(),
                "position": dataclasses.asdict(self.position),
                **self._growth_checkpoint(),
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
            self._replay_growth(checkpoint_growth(state), state)
            self.load_model_state(state)
            self.parallel.load_optimizer_state(self.optimizer, state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.position = Position(**state["position"])
        except (KeyError, RuntimeError, ValueError, TypeError, SurgeryError) as e:
            raise XrossError(f"checkpoint {path} does not fit this run ({first_line(e, 160)})") from None
        self._check_growth_plan(path)
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.dist.is_main and self.growth_plan:
            write_log(self.run_dir, self.growth_log)
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


def training_augment(config: RunConfig) -> Augment:
    """The augmentation of a run's training batches: random crop and flip, or (``augment=False``) none;
    normalisation either way."""
    return Augment() if config.augment else Augment(crop_padding=0, flip=False)
