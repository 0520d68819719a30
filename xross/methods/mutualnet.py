"""MutualNet: one network trained at every width and input resolution, from any graph.

>>> import xross
>>> xross.train(mode="mutualnet", nets=["mobilenet_v2"], widths="0.25:1.0", resolutions=[32, 28, 24, 20],
...             data="cifar10", epochs=30, out="runs/m1")                                # doctest: +SKIP

One step (the sandwich rule with inplace distillation, Yang et al. 2020): the widest
network at the largest resolution learns from the labels (cross-entropy); the narrowest
and ``sandwich - 2`` widths drawn uniformly from the range, each at a resolution drawn
from the list, learn from the widest's detached softmax (KL divergence). Gradients of all
of them accumulate in the one shared set of weights (:class:`surgery.SlimNet`), then one
optimiser step. BatchNorm statistics are re-estimated for each evaluated width and
resolution (:func:`surgery.recalibrate_bn`, US-Nets' calibration) on ``bn_batches``
training batches.

Evaluation covers the grid ``config.grid()`` (widths x resolutions): accuracy, parameters
and FLOPs of each setting, the rows of the query table (``xross table``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import surgery
from surgery.channels.slim import SlimNet
from surgery.graph.flops import count_flops, count_params
from xross.data import BatchLoader, load_split
from xross.run.config import TrainConfig
from xross.run.directory import build_slim, check_sources
from xross.run.distributed import sum_over_ranks
from xross.run.engine import RunEngine, training_augment
from xross.run.evaluate import EvalResult, PathResult, percentages, topk_correct
from xross.run.optim import ParamGroup
from xross.run.table import Method, register_method

Setting = tuple[float, int]  # (width, resolution)


def setting_name(width: float, resolution: int) -> str:
    """``0.5-224``: width 0.5 at 224x224 inputs, as MutualNet's tables name them."""
    return f"{width:g}-{resolution}"


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """``images`` at ``resolution`` x ``resolution`` (bilinear, antialiased when shrinking); as given if already."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


def sample_settings(config: TrainConfig) -> list[Setting]:
    """The sandwich of one step: widest at the largest resolution, narrowest and random widths at random ones.

    Draws from torch's global generator, which the engine seeds from the global step.
    """
    lo, hi = config.width_range()
    resolutions = config.grid()[1]
    if config.sandwich == 1:  # the widest alone: plain training, the baseline of the method
        return [(hi, resolutions[0])]
    widths = [lo] + [lo + (hi - lo) * float(torch.rand(())) for _ in range(config.sandwich - 2)]
    picks = torch.randint(len(resolutions), (len(widths),)).tolist()
    return [(hi, resolutions[0])] + [(w, resolutions[i]) for w, i in zip(widths, picks)]


def calibrate(slim: SlimNet, batches: Sequence[torch.Tensor], width: float, resolution: int) -> None:
    """Re-estimate BatchNorm statistics for ``width`` at ``resolution`` on ``batches`` of images."""
    slim.width = width
    slim.recalibrate_bn([resize(x, resolution) for x in batches])


@torch.no_grad()
def evaluate_settings(
    slim: SlimNet,
    calibration: Sequence[torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    widths: Sequence[float],
    resolutions: Sequence[int],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Top-1/top-5, parameters and FLOPs of every (width, resolution), each with its own BatchNorm statistics."""
    data = list(batches)
    rows = []
    training, previous = slim.training, slim.width
    for width in widths:
        for resolution in resolutions:
            if progress is not None:
                progress(setting_name(width, resolution))
            calibrate(slim, calibration, width, resolution)
            slim.eval()
            hits = torch.zeros(2, dtype=torch.long)
            n = 0
            for images, labels in data:
                hits += topk_correct(slim(resize(images, resolution)), labels.to(images.device))
                n += len(labels)
            percent, n = percentages(hits[None], n, reduce)
            top1, top5 = percent[0]
            net = slim.extract(width, (resolution, resolution))
            x = torch.zeros(1, 3, resolution, resolution, device=images.device, dtype=images.dtype)
            rows.append(
                PathResult(
                    path=(),
                    name=setting_name(width, resolution),
                    role="setting",
                    width=width,
                    resolution=resolution,
                    top1=top1,
                    top5=top5,
                    params=count_params(net),
                    flops=count_flops(net, x),
                )
            )
    slim.width = previous
    slim.train(training)
    return EvalResult(paths=rows, ensembles={}, samples=n)


def calibration_images(config: TrainConfig, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The batches a run recalibrates BatchNorm on: the first ``bn_batches`` of its training epoch 0."""
    train = load_split(
        config.data,
        "train",
        subset=config.subset,
        image_size=config.image_size,
        cache_dir=config.cache_dir,
        seed=config.seed,
    )
    loader = BatchLoader(train, config.batch_size, train=True, augment=training_augment(config), seed=config.seed)
    return [x.to(dtype) for x in first_batches(loader, config.bn_batches)]


def first_batches(loader: BatchLoader, count: int) -> list[torch.Tensor]:
    """The images of the first ``count`` batches of ``loader``'s epoch 0 (the same whenever asked)."""
    return [x for (x, _), _ in zip(loader.epoch(0), range(min(count, len(loader))))]


class MutualNetTrainer(RunEngine):
    """Trains one net at every width and resolution as ``config`` (``mode="mutualnet"``) says."""

    config: TrainConfig
    command_name = "train"

    # --- the engine's hooks ----------------------------------------------------------------------

    def check_inputs(self, config: TrainConfig) -> None:  # type: ignore[override]
        check_sources(config.nets, self.trust_typed, "the net")

    def build(self, resume: bool) -> None:
        self.slim = build_slim(self.config, self.device, self.dist.enabled, trust_code=self.trust_typed)
        self.slim = self.slim.to(self.dtype).train()
        if self.config.channels_last:
            self.slim = self.slim.to(memory_format=torch.channels_last)

    def param_groups(self) -> list[ParamGroup]:
        return [{"params": list(self.slim.parameters())}]

    def model_state(self) -> dict[str, Any]:
        return {"slim": self.slim.state_dict()}

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.slim.load_state_dict(state["slim"])

    def compile(self) -> None:
        self.slim.model.compile()

    # --- one step -------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step of the sandwich on a batch; returns the loss terms and the widest's accuracy."""
        images = self.prepare_images(images)
        settings = sample_settings(self.config)
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        target = None
        for i, (width, resolution) in enumerate(settings):
            self.slim.width = width
            with self.autocast():
                logits = self.slim(resize(images, resolution))
                if target is None:
                    loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
                    terms["ce_full"] = loss
                    acc = 100.0 * (logits.detach().argmax(1) == labels).float().mean()
                    target = F.softmax(logits.detach().float(), dim=1)
                else:
                    loss = F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="batchmean")
                    terms["kl_min" if i == 1 else f"kl_{i}"] = loss
            self.check_finite(terms, f" of the net at width {width:g}")
            self.backward(loss, self.params)
        self.slim.width = settings[0][0]
        self.optimizer_step()
        total = sum(t.detach() for t in terms.values())
        kl_min = terms.get("kl_min", torch.zeros(()))
        return {"loss": total, "ce_full": terms["ce_full"].detach(), "kl_min": kl_min.detach(), "acc": acc}

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {k: float(v) for k, v in self.train_step(images, labels).items()}

    def progress_text(self, row: dict[str, float]) -> str:
        return f"loss {row['loss']:.3f} ce {row['ce_full']:.3f} kl(min) {row['kl_min']:.3f} acc {row['acc']:.1f}%"

    # --- evaluation -----------------------------------------------------------------------------

    def _calibration_batches(self) -> list[torch.Tensor]:
        return [self.prepare_images(x) for x in first_batches(self.train_loader, self.config.bn_batches)]

    def _evaluate(self, widths: Sequence[float], resolutions: Sequence[int]) -> EvalResult:
        return evaluate_settings(
            self.slim,
            self._calibration_batches(),
            self.eval_batches(),
            widths,
            resolutions,
            reduce=functools.partial(sum_over_ranks, info=self.dist),
        )

    def epoch_metrics(self) -> dict[str, float]:
        widths, resolutions = self.config.grid()
        result = self._evaluate(
            sorted({widths[0], widths[-1]}, reverse=True), sorted({resolutions[0], resolutions[-1]})
        )
        top1 = {(r.width, r.resolution): r.top1 for r in result.paths}
        return {"top1_full": top1[widths[0], resolutions[0]], "top1_min": top1[widths[-1], resolutions[-1]]}

    def evaluate(self) -> EvalResult:
        """Every (width, resolution) of the config's grid on the evaluation split."""
        return self._evaluate(*self.config.grid())


def standalone_setting(config: TrainConfig, slim: SlimNet, width: float, resolution: int) -> surgery.Pieces:
    """The net at ``width`` with BatchNorm calibrated at ``resolution``, cut at the run's cut points."""
    dtype = next(slim.parameters()).dtype
    calibrate(slim, calibration_images(config, dtype), width, resolution)
    net = slim.extract(width, (resolution, resolution)).eval()
    return surgery.cut(net, config.per_net_cuts()[0], torch.zeros(1, 3, resolution, resolution, dtype=dtype))


def check_slim(config: TrainConfig) -> None:
    """MutualNet's checks of a config: one net, evaluated widths that are fractions of it."""
    if len(config.nets) != 1:
        raise ValueError(f"mutualnet trains one net; give one in --nets, not {len(config.nets)}")
    if config.eval_widths and not all(0 < w <= 1 for w in config.eval_widths):
        raise ValueError("eval_widths should be fractions in (0, 1]")


NO_PARTS = "mutualnet has no parts to exit from"
NO_LABELS = "mutualnet has no semi-supervised mode"
NO_GROWTH = (
    "mutualnet trains fractions of one net's width, which a growth would redraw; grow its net before (growth mutate)"
)
MUTUALNET = register_method(
    Method(
        "mutualnet",
        "one net at every width and resolution (sandwich rule, inplace distillation)",
        MutualNetTrainer,
        "slim",
        check=check_slim,
        why_not={
            "labeled_fraction": NO_LABELS,
            "unlabeled": NO_LABELS,
            "exits": NO_PARTS,
            "init_from": NO_PARTS,
            **dict.fromkeys(("grow", "grow_optimizer", "grow_warmup", "grow_init", "grow_kd"), NO_GROWTH),
            "teacher": "mutualnet distils its own widest network",
        },
    )
)
