"""What a run trains and evaluates on, loaded once: images (with the holdout set aside) or windows of text.

The config learns what only the data says (an image run's classes and image size, its
default holdout); under torchrun rank 0 decodes images once and the other ranks read the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from xross.data import EVAL_SPLITS, BatchLoader, ImageTensors, load_split, split_holdout
from xross.data.text import TokenLoader, load_text
from xross.run.config import RunConfig, TrainConfig
from xross.run.distributed import DistInfo


@dataclass
class RunData:
    """The training and evaluation data, the loader class of both, and the tokenizer's size (None: images)."""

    train: Any
    test: Any
    loader: type[BatchLoader]
    vocab: int | None = None


def load_run_data(config: RunConfig, dist: DistInfo, progress: bool) -> RunData:
    """Windows of token ids for a causal_lm run, else the images (``config.num_classes``, ``image_size`` and
    ``holdout`` filled in from them, the holdout split off the training images)."""
    if config.causal_lm:
        lm = cast(TrainConfig, config)
        train_text, test_text, vocab = load_text(
            lm.data, lm.seq_len, tokenizer=lm.tokenizer, eval_fraction=lm.eval_fraction, seed=lm.seed
        )
        return RunData(train_text, test_text, TokenLoader, vocab)
    train, test = _load_images(config, dist, progress)
    config.num_classes = config.num_classes or len(train.classes)
    config.image_size = config.image_size or int(train.images.shape[-1])
    if config.holdout is None:
        config.holdout = config.default_holdout(len(train), config.num_classes)
    train, _ = split_holdout(train, config.holdout, config.seed)
    return RunData(train, test, BatchLoader)


def _load_images(config: RunConfig, dist: DistInfo, progress: bool) -> tuple[ImageTensors, ImageTensors]:
    def load() -> tuple[ImageTensors, ImageTensors]:
        kw: dict[str, Any] = {
            "image_size": config.image_size,
            "cache_dir": config.cache_dir,
            "seed": config.seed,
            "progress": progress,
        }
        return load_split(config.data, "train", subset=config.subset, **kw), load_split(
            config.data, EVAL_SPLITS, subset=config.eval_subset, **kw
        )

    if not dist.enabled:
        return load()
    if dist.is_main:  # decode once; the other ranks read the cache
        data = load()
    dist.barrier()
    if not dist.is_main:
        data = load()
    return data
