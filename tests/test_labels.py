"""xross.labels and semi-supervised training: an unlabelled image gets exactly no hard-label term."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xross.data.decode import ImageTensors
from xross.data.labels import UNLABELED, hard_label_ce, labeled_accuracy, per_image_ce
from xross.data.semi import keep_labels, load_unlabeled
from xross.errors import XrossError
from xross.methods.trainer import Trainer
from xross.run.config import TrainConfig


def test_unlabelled_rows_get_zero_loss_and_zero_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, requires_grad=True)
    labels = torch.tensor([1, UNLABELED, 3, UNLABELED, 0, 4])
    per_image = per_image_ce(logits, labels, label_smoothing=0.1)
    assert torch.equal(per_image[labels == UNLABELED], torch.zeros(2))
    value = hard_label_ce(logits, labels, label_smoothing=0.1)
    labeled = labels != UNLABELED
    assert torch.allclose(value, F.cross_entropy(logits[labeled], labels[labeled], label_smoothing=0.1), atol=1e-7)
    value.backward()
    assert torch.equal(logits.grad[~labeled], torch.zeros(2, 5))
    assert bool((logits.grad[labeled] != 0).any())


def test_a_batch_without_labels_has_a_zero_term() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    value = hard_label_ce(logits, torch.full((4,), UNLABELED))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros(4, 3))
    assert np.isnan(labeled_accuracy(logits, torch.full((4,), UNLABELED)))


def test_keep_labels_is_stratified_and_deterministic() -> None:
    labels = torch.arange(10).repeat_interleave(20)
    data = ImageTensors(torch.zeros(200, 3, 2, 2, dtype=torch.uint8), labels, [str(c) for c in range(10)])
    part = keep_labels(data, 0.1, seed=3)
    kept = part.labels[part.labels != UNLABELED]
    assert torch.equal(torch.bincount(kept, minlength=10), torch.full((10,), 2))
    assert torch.equal(part.labels[part.labels != UNLABELED], labels[part.labels != UNLABELED])
    assert torch.equal(keep_labels(data, 0.1, seed=3).labels, part.labels)
    assert keep_labels(data, 1.0) is data
    with pytest.raises(XrossError, match="labeled_fraction"):
        keep_labels(data, 1.5)


def write_images(folder: Path, n: int, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return folder


def test_unlabeled_folder_is_read_at_any_depth_and_resized(tmp_path) -> None:
    data = load_unlabeled(write_images(tmp_path / "u", 5), image_size=32)
    assert data.images.shape == (5, 3, 32, 32) and torch.equal(data.labels, torch.full((5,), UNLABELED))
    with pytest.raises(XrossError, match="no images"):
        load_unlabeled((tmp_path / "empty").mkdir() or tmp_path / "empty", 32)


def test_hard_label_term_of_unlabeled_images_is_exactly_zero_in_a_run(tmp_path, cifar10_archive, data_cache) -> None:
    folder = write_images(tmp_path / "unlabeled", 48)
    cfg = TrainConfig(
        nets=["resnet18", "resnet18"], cuts=["layer2"], mode="xml", data=str(cifar10_archive), subset=64,
        eval_subset=20, batch_size=32, epochs=1, cache_dir=str(data_cache), out=str(tmp_path / "run"),
        eval_every=0, unlabeled=str(folder), labeled_fraction=0.5,
    )  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    labels = trainer.train_loader.labels
    assert len(labels) == 64 + 48 and int((labels == UNLABELED).sum()) == 32 + 48
    images, batch_labels = next(iter(trainer.train_loader.epoch(0)))
    assert bool((batch_labels == UNLABELED).any()) and bool((batch_labels != UNLABELED).any())
    logits = trainer.cohort.forward_paths(images, trainer.mode.paths(trainer.cohort))
    for path in logits:
        logits[path].retain_grad()
    for i in range(2):
        terms = trainer.mode.loss(i, logits, batch_labels, trainer.cohort).terms
        hard = sum(v for k, v in terms.items() if k.startswith("ce"))
        trainer.cohort.zero_grad()
        for v in logits.values():
            v.grad = None
        hard.backward(retain_graph=True)
        for path, value in logits.items():
            if value.grad is not None:
                assert torch.equal(
                    value.grad[batch_labels == UNLABELED],
                    torch.zeros_like(value.grad[:1]).expand(int((batch_labels == UNLABELED).sum()), -1),
                ), path
