"""The xross training loop: K networks, P parts, one objective, resumable and data-parallel.

>>> from xross.run.config import TrainConfig
>>> from xross.methods.trainer import Trainer
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

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

import surgery
from growth import MutationRecord
from growth.provenance import Origin
from surgery.core.util import evaluating
from xross.analysis.similarity import cohort_cka
from xross.cohort.exits import exit_loss, exit_prefixes
from xross.cohort.grow import grow_net
from xross.cohort.lm import per_token
from xross.cohort.lm_cohort import lm_cohort, lm_epoch_metrics, refuse_unstitched
from xross.cohort.logits import as_logits
from xross.data import ImageTensors
from xross.data.labels import UNLABELED, labeled_accuracy
from xross.data.semi import keep_labels, labeled_only, load_unlabeled, with_unlabeled
from xross.methods.objectives import DML, KD, XML, Independent, LossTerms, Mode, check_cross, check_peers, growth_kd
from xross.run.config import TrainConfig, resolve_config
from xross.run.directory import build_cohort, check_sources, load_cohort_weights
from xross.run.distributed import sum_over_ranks
from xross.run.engine import RunEngine
from xross.run.evaluate import EvalResult, evaluate, evaluate_lm
from xross.run.grower import HowToGrow
from xross.run.optim import ParamGroup
from xross.run.parallel import PARALLEL_ENGINES
from xross.run.table import Method, method_of, objective_options, register_method
from xross.run.teachers import ensemble_probs

ADAPTER_OWNERS = {"student": "any", "up": "src", "down": "dst"}


class Trainer(RunEngine):
    """Trains a cohort as ``config`` says; ``fit()`` runs to the end (or to a signal).

    Options as :class:`xross.run.engine.RunEngine`; ``trust_typed`` covers ``config.nets``.
    """

    config: TrainConfig
    command_name = "train"
    parallel_engines = PARALLEL_ENGINES

    # --- the engine's hooks ----------------------------------------------------------------------

    def check_inputs(self, config: TrainConfig) -> None:  # type: ignore[override]
        check_sources(config.nets, self.trust_typed, "the net")
        if method_of(config).needs_teacher:
            self.load_teachers(config)

    def training_images(self, train: ImageTensors, config: TrainConfig) -> ImageTensors:  # type: ignore[override]
        """Semi-supervised data: only ``labeled_fraction`` of the images keep their label, the ``unlabeled``
        folder is added; a method that learns nothing from an unlabelled image (independent) drops them."""
        train = keep_labels(train, config.labeled_fraction, config.seed)
        if config.unlabeled:
            extra = load_unlabeled(config.unlabeled, int(train.images.shape[-1]), self.progress)
            train = with_unlabeled(train, extra)
        return train if method_of(config).unlabelled else labeled_only(train)

    def build(self, resume: bool) -> None:
        config = self.config
        self.train_logits: dict[int, torch.Tensor] = {}  # each student's own-path logits of the last step
        if config.causal_lm:
            assert self.vocab is not None, "a causal_lm run's data gives the tokenizer's vocabulary"
            self.cohort = lm_cohort(config, self.vocab, self.device, trust_code=self.trust_typed).to(self.dtype)
        else:
            self.cohort = build_cohort(config, self.device, self.dist.enabled, trust_code=self.trust_typed)
            self.cohort = self.cohort.to(self.dtype)
        if config.channels_last:
            self.cohort = self.cohort.to(memory_format=torch.channels_last)
        method = method_of(config)
        assert method.objective is not None, f"method {method.name} trains a cohort: it needs an objective"
        self.mode: Mode = method.objective(**objective_options(config, method))
        self.paths = self.mode.paths(self.cohort)
        refuse_unstitched(self.cohort, self.paths, config.mode)
        self.exit_prefixes = exit_prefixes(self.paths, self.cohort.num_parts) if config.exits else []
        if config.init_from and not resume:
            load_cohort_weights(self.cohort, Path(config.init_from), verify=self.verify)
        self.parallel.shard(self.cohort, self.units())
        self.trainables = [self._trainables(i) for i in range(self.cohort.num_nets)]

    def param_groups(self) -> list[ParamGroup]:
        if self.config.frozen_cohort:
            return [{"params": list(self.cohort.exits.parameters())}]  # type: ignore[union-attr]
        return [{"params": list(self.cohort.parameters())}]

    def units(self) -> list[nn.Module]:
        """What ``--parallel fsdp`` shards one by one: every piece of every net, every adapter, every exit head."""
        pieces = [piece for net in self.cohort.nets for piece in net]  # type: ignore[attr-defined]
        heads = list(self.cohort.exits.heads.values()) if self.cohort.exits is not None else []
        return [*pieces, *self.cohort.adapters.values(), *heads]

    def model_state(self) -> dict[str, Any]:
        return {"cohort": self.parallel.model_state(self.cohort)}

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.parallel.load_model_state(self.cohort, state["cohort"])

    def compile(self) -> None:
        for net in self.cohort.nets:
            for piece in net:  # type: ignore[attr-defined]  # each net is a ModuleList of its parts
                piece.compile()

    # --- growth during training ----------------------------------------------------------------

    def growable(self) -> list[nn.Module]:
        return [w for w in self.cohort.wholes if w is not None]

    def growth_state(self) -> dict[str, Any]:
        return {"cohort": self.cohort, "trainables": self.trainables}

    def grow_net(
        self, net: int, steps: list[MutationRecord], example: torch.Tensor | None, how: HowToGrow | None
    ) -> dict[nn.Parameter, Origin]:
        cfg = self.config
        origins = grow_net(
            self.cohort,
            net,
            steps,
            cfg.image_size or 0,
            example=example,
            carry=how is not None and how.carry,
            init=how.init if how is not None else "copy",
            seed=how.seed if how is not None else 0,
            transform=self.batchnorm_transform(),
        )
        if cfg.channels_last:
            self.cohort = self.cohort.to(memory_format=torch.channels_last)
        self.trainables = [self._trainables(i) for i in range(self.cohort.num_nets)]
        return origins

    def _grow(self, planned: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.config.causal_lm:  # growth.jsonl's token CE ignores the padded positions (-100: PyTorch's ignore)
            labels = labels.masked_fill(labels == UNLABELED, -100)
        super()._grow(planned, images, labels)

    def _growth_example(self) -> torch.Tensor:
        if self.config.causal_lm:  # what a decoder's growth is measured on: two windows of token ids
            return torch.zeros(2, self.config.seq_len, dtype=torch.int64, device=self.device)
        return super()._growth_example()

    def growth_probe(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        own = [self.cohort.own_path(i) for i in range(self.cohort.num_nets)]
        paths = list(dict.fromkeys([*own, *self.paths]))
        with torch.no_grad(), evaluating(self.cohort):
            logits = self.cohort.forward_paths(images, paths)
        if self.config.causal_lm:  # (B, V, T): the layout of a cross-entropy per token against (B, T) targets
            logits = {p: v.transpose(1, 2) for p, v in logits.items()}
        return {(f"net{p[0]}" if p in own else "path" + "-".join(map(str, p))): v for p, v in logits.items()}

    def forward_flops(self) -> tuple[int, int]:
        size = self.config.image_size or 32
        trained = self.cohort.forward_flops(self.paths, size)
        if self.teachers is None:
            return trained, 0
        ref = next(self.cohort.parameters())
        with torch.no_grad():
            fixed = surgery.count_flops(
                self.teachers, torch.zeros(1, 3, size, size, dtype=ref.dtype, device=ref.device)
            )
        return trained, fixed

    def _trainables(self, i: int) -> list[nn.Parameter]:
        """Parameters student i's loss updates: its net, the adapters it owns and its exit heads
        (only the heads with ``frozen_cohort``)."""
        heads = self.cohort.exits.parameters_of(i) if self.cohort.exits is not None else []
        if self.config.frozen_cohort:
            return heads
        return (
            self.cohort.net_parameters(i)
            + self.cohort.adapter_parameters(i, ADAPTER_OWNERS[self.config.adapter_update])
            + heads
        )

    # --- one step -----------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor | None:
        """KD target as logits whose softmax at temperature T is the teachers' (weighted) mean softmax at T."""
        if self.teachers is None:
            return None
        t = self.config.temperature
        probs = ensemble_probs(self.teachers(images), t, self.teacher_weights)
        return probs.clamp_min(1e-12).log() * t

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, students: list[int] | None = None
    ) -> dict[int, LossTerms]:
        """One optimizer step on a batch; only ``students`` (default all) learn from it."""
        students = list(range(self.cohort.num_nets)) if students is None else students
        images = self.prepare_images(images)
        if self.config.frozen_cohort:  # BatchNorm statistics stay as the trained cohort left them
            self.cohort.nets.eval()
            self.cohort.adapters.eval()
        values: dict = {}
        with self.autocast(), torch.set_grad_enabled(not self.config.frozen_cohort):
            logits = self.cohort.forward_paths(images, self.paths, shared=self.config.shared_prefixes, prefixes=values)
        windows = labels
        if self.config.causal_lm:  # (B, T, V) and (B, T) as tokens: every term is then a mean over tokens
            logits, labels = per_token(logits, labels)
        self.train_targets = labels
        with self.autocast():
            target = self.teacher_logits(images)
            losses = {i: self._loss(i, logits, values, labels, target) for i in students}
            losses = self._with_growth_kd(images, logits, losses, windows)
        for i, loss in losses.items():
            self.check_finite(loss.terms, f" of net {i} ({self.config.nets[i]})")
        self.optimizer.zero_grad(set_to_none=True)
        share = self._token_share(labels) if self.config.causal_lm else 1.0
        if self.config.schedule == "joint":
            self.backward(torch.stack([loss.total for loss in losses.values()]).sum() * share, self.params)
        else:
            for n, (i, loss) in enumerate(losses.items()):
                self.backward(loss.total * share, self.trainables[i], retain_graph=n < len(losses) - 1)
        self.optimizer_step()
        self.train_logits = {i: logits[self.cohort.own_path(i)].detach() for i in students}
        return losses

    def _token_share(self, tokens: torch.Tensor) -> float:
        """This rank's tokens over the mean number per rank: a rank's terms are means over its own tokens, and a
        window cut short at the end of the text leaves the ranks different numbers of them; weighting each
        rank's loss so makes the averaged gradient the gradient of the mean over every rank's tokens (1.0 in
        one process)."""
        if not self.dist.enabled:
            return 1.0
        total = sum_over_ranks(torch.tensor([float(len(tokens))], dtype=torch.float64), self.dist)
        return len(tokens) * self.dist.world_size / float(total)

    def _with_growth_kd(
        self,
        images: torch.Tensor,
        logits: dict[tuple[int, ...], torch.Tensor],
        losses: dict[int, LossTerms],
        windows: torch.Tensor,
    ) -> dict[int, LossTerms]:
        """``--grow-kd``: the nets just grown also distil from themselves as they were before."""
        kd = self.config.grow_kd_terms()
        if kd is None:
            return losses
        out = dict(losses)
        for i in losses:
            before = self.growth_teacher(i)
            if before is not None:
                with torch.no_grad():
                    target = as_logits(before(images), "the net before its growth")
                if self.config.causal_lm:  # its tokens, as the student's
                    target = per_token({(): target}, windows)[0][()]
                out[i] = growth_kd(losses[i], logits[self.cohort.own_path(i)], target, kd[0], kd[1])
        return out

    def _loss(
        self,
        i: int,
        logits: dict[tuple[int, ...], torch.Tensor],
        values: dict[tuple[int, ...], Any],
        labels: torch.Tensor,
        target: torch.Tensor | None,
    ) -> LossTerms:
        """Student i's loss: the mode's terms (none with ``frozen_cohort``) plus its exit terms."""
        if self.config.frozen_cohort:
            loss = LossTerms({}, torch.zeros((), device=labels.device))
        else:
            loss = self.mode.loss(i, logits, labels, self.cohort, target)
        if self.exit_prefixes:
            own = [p for p in self.exit_prefixes if p[-1] == i]
            term = exit_loss(
                self.cohort.exits,  # type: ignore[arg-type]
                values,
                own,
                labels,
                self.config.exit_weight_list(),
                self.config.label_smoothing,
            )
            if i in term:
                loss = LossTerms({**loss.terms, "exits": term[i]}, loss.total + term[i])
        return loss

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        losses = self.train_step(images, labels)
        row: dict[str, float] = {}
        for i, loss in losses.items():
            row[f"loss{i}"] = float(loss.total.detach())
            row[f"acc{i}"] = labeled_accuracy(self.train_logits[i], self.train_targets)
            for group, value in term_groups(loss.terms).items():
                row[f"{group}{i}"] = value
        return row

    def progress_text(self, row: dict[str, float]) -> str:
        nets = sorted({k[4:] for k in row if k.startswith("loss")})
        return "  ".join(f"loss{i} {row[f'loss{i}']:.3f} acc{i} {row[f'acc{i}']:.1f}%" for i in nets)

    # --- evaluation -----------------------------------------------------------------------------

    def epoch_metrics(self) -> dict[str, float]:
        own = [self.cohort.own_path(i) for i in range(self.cohort.num_nets)]
        result = self.evaluate(own)
        if self.config.causal_lm:
            return lm_epoch_metrics(result, self.cohort.num_nets, self.cohort.num_parts)
        row = {f"top1_net{i}": result.own(i, self.cohort.num_parts).top1 for i in range(self.cohort.num_nets)}
        row["top1_ensemble"] = result.ensembles["nets"].top1
        row.update({f"top1_exit_{'-'.join(map(str, e.prefix))}": e.top1 for e in result.exits})  # with --exits
        if self.config.cka_images:
            row.update(self.cka())
        return row

    def cka(self) -> dict[str, float]:
        """Linear CKA of the nets' features at every cut on the first ``cka_images`` test images."""
        images, left = [], self.config.cka_images
        for x, _ in self.eval_batches():
            images.append(x[:left])
            left -= len(images[-1])
            if left <= 0:
                break
        return {f"cka_{key}": value for key, value in cohort_cka(self.cohort, images).items()}

    def evaluate(self, paths: list[tuple[int, ...]] | None = None) -> EvalResult:
        """Top-1/top-5 of ``paths`` (default all) on the evaluation split (causal LMs: loss and perplexity too);
        each rank scores its part of every batch."""
        reduce = functools.partial(sum_over_ranks, info=self.dist)
        lockstep = self.parallel.lockstep
        if self.config.causal_lm:
            return evaluate_lm(self.cohort, self.eval_batches(), paths, reduce=reduce, lockstep=lockstep)
        return evaluate(
            self.cohort,
            self.eval_batches(),
            self.config.image_size or 0,  # known once the data is loaded, before the first step
            paths,
            reduce=reduce,
            lockstep=lockstep,
        )


def term_groups(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """A student's loss terms for the metrics, unweighted: its own path's (``ce``, ``kl``, ``kd``, ``exits``) and,
    for xml, the mean over its cross paths of their CE and KL terms (``cross_ce``, ``cross_kl``: on the own
    path's scale, so the two can be compared)."""
    groups = {k: float(v.detach()) for k, v in terms.items() if "@" not in k}
    for kind in ("ce", "kl"):
        cross = [float(v.detach()) for k, v in terms.items() if k.startswith(f"{kind}@")]
        if cross:
            groups[f"cross_{kind}"] = sum(cross) / len(cross)
    return groups


def train(
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    trust_code: bool = False,
    **overrides: Any,
) -> EvalResult:
    """Train what ``config`` describes (a cohort, or with ``mode="mutualnet"`` one net at every width), its
    fields overridden by ``overrides`` (fields of :class:`xross.run.config.TrainConfig`; a name that is not
    one is refused in one line with the closest ones). The method's engine comes from the table.

    With ``resume=True`` the run in ``out`` continues with its own config (``overrides`` may
    raise ``epochs``). Returns the evaluation of every path (also in ``out/eval.json``).

    >>> import tempfile, xross
    >>> from pathlib import Path
    >>> from xross.data.synthetic import write_synthetic
    >>> tmp = Path(tempfile.mkdtemp())
    >>> data = write_synthetic(tmp / "data", train_per_class=4, test_per_class=2)
    >>> vgg = "growth.models:small_vgg"  # a small VGG, cut after its first stage
    >>> config = xross.TrainConfig(nets=[vgg, vgg], cuts=["features.1"], mode="dml", data=str(data), batch_size=20,
    ...                            epochs=1, eval_every=0, cache_dir=str(tmp / "cache"), out=str(tmp / "run"))
    >>> result = xross.train(config, progress=False, lr=1e-3)
    >>> [r.path for r in result.paths], result.samples
    ([(0, 0), (0, 1), (1, 0), (1, 1)], 20)
    >>> xross.train(config, epoks=2)
    Traceback (most recent call last):
    ...
    xross.errors.XrossError: the options: field 'epoks' is not a known field (closest: epochs, step_epochs); see ...
    """
    config = resolve_config(TrainConfig, config, overrides, resume=resume)
    engine = method_of(config).engine
    return engine(config, resume=resume, force=force, progress=progress, trust_code=trust_code).fit()  # type: ignore[no-any-return]


COHORT_METHODS = (
    Method("independent", "each net learns from the labels alone (cross-entropy)", Trainer, "cohort",
           objective=Independent, unlabelled=False,
           why_not={"unlabeled": "independent learns nothing from unlabelled images"}),
    Method("kd", "each net learns from the labels and fixed --teacher models (knowledge distillation)", Trainer,
           "cohort", objective=KD, needs_teacher=True),
    Method("dml", "each net learns from the labels and its peers (deep mutual learning)", Trainer, "cohort",
           objective=DML, check=check_peers),
    Method("xml", "DML plus the stitched paths across nets (cross mutual learning, the research's)", Trainer,
           "cohort", objective=XML, check=check_cross),
)  # fmt: skip
for _method in COHORT_METHODS:
    register_method(_method)
