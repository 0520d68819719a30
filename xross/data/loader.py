"""Batching a decoded split: deterministic, resumable, shardable epochs of augmented batches.

>>> from xross.data.decode import ImageTensors
>>> data = ImageTensors(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), torch.arange(6) % 3, ["a", "b", "c"])
>>> [y.tolist() for _, y in BatchLoader(data, 4, train=False).epoch(0)]
[[0, 1, 2, 0], [1, 2]]
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import torch

from xross.data.augment import Augment, seeded_generator
from xross.data.decode import ImageTensors
from xross.errors import XrossError

__all__ = ["BatchLoader", "loader_throughput", "shard"]


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous part of ``n`` samples (``torch.tensor_split`` sizes: they differ by at most one).

    >>> [shard(5, rank, 2) for rank in (0, 1)]
    [slice(0, 3, None), slice(3, 5, None)]
    """
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


class BatchLoader:
    """Deterministic epochs of augmented batches, resumable mid-epoch, shardable across ranks.

    ``batch_size`` is the global batch size. Each step takes the next ``batch_size``
    indices of the epoch order (a permutation seeded by ``(seed, epoch)`` when ``train``,
    the natural order otherwise) and rank ``r`` of ``world_size`` keeps the ``r``-th of
    ``world_size`` contiguous, near-equal parts of them (the :func:`torch.tensor_split`
    split). The augmentation of step ``s`` is drawn for the whole global batch from a
    generator seeded by ``(seed, epoch, s)`` and sliced the same way. So the ranks of a
    data-parallel run together see exactly the samples, and exactly the augmentation,
    of a one-process run with the same global batch. With ``drop_last=False`` (the
    default when evaluating) the last batch is partial and is split the same way, so
    each sample is seen exactly once overall; a rank's part of it may be empty.

    The uint8 images are moved to ``device`` once; batches are gathered, augmented and
    normalised there. ``train=False`` only normalises (with ``augment``'s mean and std).

    >>> data = ImageTensors(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10) % 2, ["a", "b"])
    >>> loader = BatchLoader(data, batch_size=4, seed=1)
    >>> labels = [y.tolist() for _, y in loader.epoch(0)]
    >>> len(loader), [y.tolist() for _, y in loader.epoch(0, start_step=1)] == labels[1:]
    (2, True)
    >>> [len(y) for _, y in BatchLoader(data, 4, train=False, rank=1, world_size=2).epoch(0)]
    [2, 2, 1]
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        *,
        train: bool = True,
        augment: Augment | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0 or world_size <= 0 or batch_size % world_size:
            raise XrossError(
                f"batch_size={batch_size} is not a positive multiple of world_size={world_size}; "
                "batch_size is the global batch, pass a multiple of the number of processes"
            )
        if not 0 <= rank < world_size:
            raise XrossError(f"rank={rank} is outside 0..{world_size - 1} for world_size={world_size}")
        self.batch_size = batch_size
        self.train = train
        self.augment = augment if augment is not None else Augment()
        self.device = torch.device(device)
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.rank = rank
        self.world_size = world_size
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        if len(self) == 0 and len(data) > 0:
            raise XrossError(
                f"{len(data)} images make no full batch of {batch_size}; lower batch_size or pass drop_last=False"
            )

    def __len__(self) -> int:
        """Steps per epoch."""
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(float images, int64 labels)`` batches of ``epoch`` from step ``start_step`` on."""
        if not 0 <= start_step <= len(self):
            raise XrossError(f"start_step={start_step} is outside 0..{len(self)} (steps per epoch)")
        order = self._order(epoch)
        return (self._batch(order, epoch, step) for step in range(start_step, len(self)))

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if not self.train:
            return torch.arange(n, device=self.device)
        return torch.randperm(n, generator=seeded_generator("order", self.seed, epoch)).to(self.device)

    def _batch(self, order: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = order[step * self.batch_size : (step + 1) * self.batch_size]
        mine = shard(len(batch), self.rank, self.world_size)
        params = None
        if self.train:
            params = self.augment.sample(len(batch), seeded_generator("augment", self.seed, epoch, step))[mine]
        index = batch[mine]
        return self.augment.apply(self.images[index], params), self.labels[index]


def loader_throughput(
    data: ImageTensors, batch_size: int = 64, steps: int = 50, device: torch.device | str = "cpu"
) -> float:
    """Augmented images per second of the training pipeline alone (no model), over ``steps`` batches.

    >>> data = ImageTensors(torch.zeros(128, 3, 32, 32, dtype=torch.uint8), torch.zeros(128, dtype=torch.int64), ["a"])
    >>> loader_throughput(data, batch_size=64, steps=3) > 0
    True
    """
    if steps <= 0:
        raise XrossError(f"steps={steps} is not positive; pass steps>=1")
    loader = BatchLoader(data, batch_size, device=device)
    batches = itertools.islice(itertools.chain.from_iterable(map(loader.epoch, itertools.count())), steps)
    start = time.perf_counter()
    seen = sum(len(images) for images, _ in batches)
    if loader.device.type == "cuda":
        torch.cuda.synchronize(loader.device)
    return seen / (time.perf_counter() - start)
