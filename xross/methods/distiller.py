"""Ensemble distillation into one student (MEAL V2), with a cohort's stitched paths as teachers.

>>> import xross
>>> result = xross.distill(student="runs/x1@1-1", teacher=["runs/x1"], teacher_paths="all",
...                  data="../shared/data/cifar10-jpeg.tar.xz", epochs=2, out="runs/d1")  # doctest: +SKIP

One step: the teachers (eval mode, no_grad; a cohort's shared prefixes run once) give
logits ``t_k``; their weighted mean softmax at temperature T is the soft target ``q``;
the student's loss is :class:`xross.methods.objectives.DistillLoss` (soft cross-entropy to ``q``,
no one-hot labels by default) plus, unless ``discriminator="off"``, the discriminator's
binary cross-entropy between the student's logits and the teachers' mean logits (see
:mod:`xross.methods.discriminator` for the sign the student receives). One optimiser updates the
student and, in its own parameter group at ``d_lr``, the discriminator.

The student a run starts from is saved in ``RUN/student-init`` before the first step, so
resuming, evaluating and exporting never need the reference it came from.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

import surgery
from growth import MutationRecord
from growth.provenance import Origin
from surgery.core.errors import SurgeryError, UserError
from surgery.core.util import evaluating, first_line
from surgery.files.refs import parse as parse_reference
from xross.cohort.grid import build_net
from xross.cohort.grow import grow_model
from xross.cohort.logits import as_logits
from xross.errors import XrossError
from xross.methods.discriminator import Discriminator
from xross.methods.objectives import DistillLoss, growth_kd
from xross.run.config import DistillConfig, resolve_config
from xross.run.directory import STUDENT_INIT, check_sources, initial_student
from xross.run.distributed import globalise_batchnorm, sum_over_ranks
from xross.run.engine import RunEngine
from xross.run.evaluate import EvalResult, evaluate_distillation
from xross.run.grower import HowToGrow
from xross.run.optim import ParamGroup
from xross.run.table import Method, register_method
from xross.run.teachers import Teachers, check_classes, ensemble_logits, ensemble_probs


def make_student(
    config: DistillConfig, *, trust_code: bool = False, trust_typed: bool = False, verify: bool = True
) -> nn.Module:
    """The student ``config.student`` names, with seeded initial weights for a built model.

    A model reference is built for ``config.num_classes`` (with the config's stem;
    ``trust_typed`` lets it name outside code); a run's path, a saved model or pieces come
    with their trained weights, as they are (``trust_code`` lets their files name outside code).
    """
    assert config.num_classes is not None
    torch.manual_seed(config.seed)
    try:
        if parse_reference(config.student).kind == "build":
            return build_net(config.student, config.num_classes, config.stem, trust_code=trust_typed)
        return surgery.refs.load(config.student, trust_code=trust_code, trust_typed=False, verify=verify)
    except UserError as e:
        raise XrossError(f"student '{config.student}' could not be loaded: {e}") from None
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise XrossError(f"student '{config.student}' could not be loaded: {first_line(e, 200)}") from None


class Distiller(RunEngine):
    """Distils ``config.teacher`` into ``config.student``; ``fit()`` runs to the end (or to a signal).

    Options as :class:`xross.run.engine.RunEngine`; ``trust_typed`` covers a student given as a
    model reference.
    """

    config: DistillConfig
    command_name = "distill"

    # --- the engine's hooks ----------------------------------------------------------------------

    def check_inputs(self, config: DistillConfig) -> None:  # type: ignore[override]
        check_sources([config.student], self.trust_typed, "the student")
        self.load_teachers(config)

    def build(self, resume: bool) -> None:
        cfg = self.config
        assert cfg.num_classes is not None and cfg.image_size is not None
        if resume:
            student = initial_student(self.run_dir, trust_code=self.trust_code)
        else:
            student = make_student(cfg, trust_code=self.trust_code, trust_typed=self.trust_typed, verify=self.verify)
            if self.dist.is_main:
                surgery.save(student, self.run_dir / STUDENT_INIT)
        if self.dist.enabled and cfg.sync_bn:
            student = globalise_batchnorm(student, self.device)
        self.student = student.to(device=self.device, dtype=self.dtype).train()
        if cfg.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self._check_classes()
        self.loss = DistillLoss(cfg.temperature, cfg.soft_weight, cfg.hard_weight, cfg.label_smoothing)
        self.needs_teachers = cfg.soft_weight > 0 or cfg.discriminator != "off"
        torch.manual_seed(cfg.seed + 1)
        self.discriminator = (
            None
            if cfg.discriminator == "off"
            else Discriminator(cfg.num_classes, cfg.d_hidden, cfg.discriminator).to(self.device, self.dtype)
        )

    def _check_classes(self) -> None:
        cfg = self.config
        assert cfg.num_classes is not None and cfg.image_size is not None
        x = torch.zeros(2, 3, cfg.image_size, cfg.image_size, device=self.device, dtype=self.dtype)
        try:
            with torch.no_grad(), evaluating(self.student):
                out = as_logits(self.student(x), f"student '{cfg.student}'")
        except (RuntimeError, ValueError, TypeError) as e:
            raise XrossError(
                f"student '{cfg.student}' fails on {cfg.image_size}x{cfg.image_size} images: {first_line(e, 200)}"
            ) from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != cfg.num_classes:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise XrossError(
                f"student '{cfg.student}' gives outputs of shape {shape} but the data has {cfg.num_classes} "
                "classes; give a student with that many classes (or --num-classes)"
            )
        check_classes(self._teachers(), cfg.num_classes, cfg.image_size, self.dtype, "the data")

    def _teachers(self) -> Teachers:
        """The teachers, which ``check_inputs`` loaded before anything was built."""
        assert self.teachers is not None, "the distiller's teachers are loaded by check_inputs"
        return self.teachers

    def param_groups(self) -> list[ParamGroup]:
        groups: list[ParamGroup] = [{"params": list(self.student.parameters())}]
        if self.discriminator is not None:
            scale = (self.config.d_lr or self.config.lr) / self.config.lr
            groups.append({"params": list(self.discriminator.parameters()), "lr_scale": scale})
        return groups

    def model_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"student": self.student.state_dict()}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
        return state

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])

    def compile(self) -> None:
        self.student.compile()

    # --- growth during training ----------------------------------------------------------------

    def growable(self) -> list[nn.Module]:
        return [self.student]

    def growth_state(self) -> dict[str, Any]:
        return {"student": self.student}

    def grow_net(
        self, net: int, steps: list[MutationRecord], example: torch.Tensor | None, how: HowToGrow | None
    ) -> dict[nn.Parameter, Origin]:
        cfg = self.config
        x = example if example is not None else self._growth_example()
        try:
            grown, origins = grow_model(
                self.student,
                steps,
                x,
                carry=how is not None and how.carry,
                init=how.init if how is not None else "copy",
                seed=how.seed if how is not None else 0,
            )
        except SurgeryError as e:
            raise XrossError(f"growing the student: {first_line(e)}") from None
        transform = self.batchnorm_transform()
        self.student = (transform(grown) if transform is not None else grown).train()
        if cfg.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        return origins

    def growth_probe(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), evaluating(self.student):
            return {"net0": as_logits(self.student(images), "the student")}

    def forward_flops(self) -> tuple[int, int]:
        x = self._growth_example()[:1]
        with torch.no_grad():
            fixed = surgery.count_flops(self._teachers(), x) if self.needs_teachers else 0
            return surgery.count_flops(self.student, x), fixed

    # --- one step -------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch; returns the loss terms (``loss`` their total) and ``acc``."""
        images = self.prepare_images(images)
        with self.autocast():
            if self.needs_teachers:
                teacher_logits = self._teachers()(images)
                target = ensemble_probs(teacher_logits, self.config.temperature, self.teacher_weights)
            else:  # labels alone (soft_weight 0, no discriminator): the teachers are only evaluated
                teacher_logits, target = [], images.new_zeros(())
            logits = as_logits(self.student(images), "the student")
            loss = self.loss(logits, target, labels)
            kd, before = self.config.grow_kd_terms(), self.growth_teacher(0)
            if kd is not None and before is not None:
                with torch.no_grad():
                    grown_from = as_logits(before(images), "the student before its growth")
                loss = growth_kd(loss, logits, grown_from, kd[0], kd[1])
            terms, total = dict(loss.terms), loss.total
            if self.discriminator is not None:
                d = self.discriminator.loss(logits, ensemble_logits(teacher_logits, self.teacher_weights))
                total = total + d["d_loss"]
                terms.update(d)
        self.check_finite({"loss": total, **terms}, f" of the student ({self.config.student})")
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(total, self.params)
        self.optimizer_step()
        acc = 100.0 * (logits.detach().argmax(1) == labels).float().mean()
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}, "acc": acc}

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {k: float(v) for k, v in self.train_step(images, labels).items()}

    def progress_text(self, row: dict[str, float]) -> str:
        text = f"loss {row['loss']:.3f} acc {row['acc']:.1f}%"
        return text + (f"  d_acc {row['d_acc']:.0f}%" if "d_acc" in row else "")

    # --- evaluation -----------------------------------------------------------------------------

    def _evaluate(self, teachers: bool) -> EvalResult:
        return evaluate_distillation(
            self.student,
            self.teachers if teachers else None,
            self.teacher_weights,
            self.eval_batches(),
            self.config.image_size or 0,
            reduce=functools.partial(sum_over_ranks, info=self.dist),
            student_name=self.config.student,
        )

    def epoch_metrics(self) -> dict[str, float]:
        return {"top1_student": self._evaluate(teachers=False).paths[0].top1}

    def evaluate(self) -> EvalResult:
        """The student, each teacher and the teachers' ensemble on the evaluation split."""
        return self._evaluate(teachers=True)


def distill(
    config: DistillConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    trust_code: bool = False,
    **overrides: Any,
) -> EvalResult:
    """Run the distillation ``config`` describes, its fields overridden by ``overrides`` (fields of
    :class:`xross.run.config.DistillConfig`; a name that is not one is refused in one line with the closest).

    With ``resume=True`` the run in ``out`` continues with its own config (``overrides`` may
    raise ``epochs``). Returns the final evaluation (also in ``out/eval.json``).

    >>> import tempfile, xross
    >>> from pathlib import Path
    >>> from xross.data.synthetic import write_synthetic
    >>> tmp = Path(tempfile.mkdtemp())
    >>> data = write_synthetic(tmp / "data", train_per_class=4, test_per_class=2)
    >>> options = dict(data=str(data), batch_size=20, epochs=1, eval_every=0, cache_dir=str(tmp / "cache"))
    >>> vgg = "growth.models:small_vgg"  # a small VGG
    >>> teacher = xross.train(nets=[vgg], cuts=["features.1"], mode="independent", out=str(tmp / "t"),
    ...                       progress=False, **options)
    >>> result = xross.distill(student=vgg, teacher=[str(tmp / "t")], out=str(tmp / "d"), progress=False, **options)
    >>> [r.role for r in result.paths]
    ['student', 'teacher']
    """
    config = resolve_config(DistillConfig, config, overrides, resume=resume)
    return Distiller(config, resume=resume, force=force, progress=progress, trust_code=trust_code).fit()


DISTILL = register_method(
    Method(
        "distill",
        "one student learns from teachers' ensemble (MEAL V2; `xross distill`)",
        Distiller,
        "student",
        command="distill",
        needs_teacher=True,
    )
)
