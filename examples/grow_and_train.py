"""Grow a small VGG-like net in the middle of its CIFAR-10 training, without losing what it learned.

    python examples/grow_and_train.py --data cifar10-jpeg.tar.xz   # 10k images, 10 epochs: ~3.5 min on 2 cores
    python examples/grow_and_train.py --data cifar10-jpeg.tar.xz --subset 5000 --epochs 6 --grow-at-epoch 3 --out vgg
    python examples/grow_and_train.py --subset 640 --test-subset 320 --epochs 3 --grow-at-epoch 1   # generated data

``--data`` is CIFAR-10 as an ImageFolder directory or a .tar/.tar.gz/.tar.xz archive of one
(``<split>/<class>/<image>``). Without it the script generates a CIFAR-10-like stand-in
(:mod:`xross.data.synthetic`: 10 classes of 32x32 JPEGs, exactly ``--subset`` training and
``--test-subset`` test images) in the cache directory, and trains on that.

The net trains for ``--grow-at-epoch`` epochs. Then it grows, deeper then wider
(Net2Net's more stable order): ``growth.net2deeper`` inserts an identity
conv-BN-ReLU after the last stage, ``growth.net2wider`` widens every conv by
``--factor`` (with zero-sum noise on the copies' outgoing weights, which breaks
their symmetry but not the function). Test accuracy right before and right after
growth is measured on the same images: it must be equal. Both the grown net and an
ungrown copy then train for the remaining epochs (same data order, same learning
rate schedule, a fresh optimizer for each), and the script reports which ends higher.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import growth
import surgery
from xross.data import BatchLoader, default_cache_dir, load_split
from xross.data.synthetic import CIFAR10_CLASSES, write_synthetic


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="CIFAR-10 ImageFolder archive or directory (default: generate a CIFAR-10-like stand-in)",
    )
    p.add_argument("--subset", type=int, default=10000, help="training images (stratified)")
    p.add_argument("--test-subset", type=int, default=2000, help="test images (stratified)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--grow-at-epoch", type=int, default=5, help="grow after this many epochs")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128], help="channels of each conv stage")
    p.add_argument("--factor", type=float, default=1.5, help="net2wider factor for every conv")
    p.add_argument("--noise", type=float, default=0.05, help="zero-sum noise on the copies' outgoing weights")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None, help="where the decoded images are cached")
    p.add_argument("--out", type=Path, default=None, help="save the grown net here (load with surgery.load)")
    args = p.parse_args(argv)
    if not 0 < args.grow_at_epoch < args.epochs:
        p.error(f"--grow-at-epoch must be between 1 and {args.epochs - 1}")
    if min(args.subset, args.test_subset) <= 0:
        p.error("--subset and --test-subset must be positive numbers of images")
    return args


def generated_data(args: argparse.Namespace) -> Path:
    """Without ``--data``: a CIFAR-10-like stand-in of ``--subset`` + ``--test-subset`` images, made once per size."""
    train, test = (-(-n // len(CIFAR10_CLASSES)) for n in (args.subset, args.test_subset))  # images per class
    cache = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    root = write_synthetic(
        cache / "synthetic" / f"cifar10-{train}x{test}-seed{args.seed}",
        train_per_class=train,
        test_per_class=test,
        seed=args.seed,
    )
    print(
        f"no --data: training on a generated CIFAR-10 stand-in in {root} "
        "(pass --data path/to/cifar10-jpeg.tar.xz for the real images)"
    )
    return root


@torch.no_grad()
def accuracy(model: nn.Module, loader: BatchLoader) -> float:
    """Top-1 accuracy (%) in eval mode."""
    model.eval()
    correct = total = 0
    for images, labels in loader.epoch(0):
        correct += int((model(images).argmax(1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / total


def train_epoch(model: nn.Module, loader: BatchLoader, epoch: int, optimizer: torch.optim.Optimizer) -> float:
    """One epoch of SGD; returns the mean training loss."""
    model.train()
    losses = []
    for images, labels in loader.epoch(epoch):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def grow(model: nn.Module, images: torch.Tensor, factor: float, noise: float, seed: int) -> nn.Module:
    """Deeper then wider: an identity conv-BN-ReLU after the last stage, then every conv ``factor`` times wider.

    ``images`` (real training images) give the new BatchNorm the statistics of the
    value it follows, so it stays close to the identity in training mode too.
    """
    last = len(model.features) - 1
    deeper = growth.net2deeper(model, f"features.{last}.block.relu", kind="conv", kernel_size=3, example_input=images)
    convs = [name for name, m in deeper.named_modules() if isinstance(m, nn.Conv2d)]
    return growth.net2wider(deeper, convs, factor=factor, noise=noise, seed=seed, example_input=images)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = args.data if args.data is not None else generated_data(args)
    train = load_split(data, "train", subset=args.subset, cache_dir=args.cache_dir, seed=args.seed)
    test = load_split(data, "test", subset=args.test_subset, cache_dir=args.cache_dir, seed=args.seed)
    train_loader = BatchLoader(train, args.batch_size, seed=args.seed)
    test_loader = BatchLoader(test, 256, train=False)
    model = surgery.build_model("growth.models:small_vgg", widths=list(args.widths), num_classes=len(train.classes))
    print(
        f"{len(train)} training and {len(test)} test images of {len(train.classes)} classes; "
        f"{surgery.count_params(model):,} parameters; {len(train_loader)} steps per epoch"
    )

    optimizer = sgd(model, args.lr)
    for epoch in range(args.grow_at_epoch):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(args.lr, epoch, args.epochs)
        loss = train_epoch(model, train_loader, epoch, optimizer)
        acc, seconds = accuracy(model, test_loader), time.perf_counter() - start
        print(f"epoch {epoch + 1}: loss {loss:.3f}, test accuracy {acc:.2f}% ({seconds:.0f} s)")

    before = accuracy(model, test_loader)
    images, _ = next(BatchLoader(train, min(256, len(train)), train=False).epoch(0))
    grown = grow(model, images, args.factor, args.noise, args.seed)
    after = accuracy(grown, test_loader)
    print(
        f"growth: {surgery.count_params(model):,} -> {surgery.count_params(grown):,} parameters; "
        f"test accuracy right before {before:.2f}%, right after {after:.2f}% "
        f"({'equal' if after == before else 'DIFFERENT'})"
    )

    runs = {"grown": (grown, sgd(grown, args.lr)), "ungrown": (model, sgd(model, args.lr))}
    final: dict[str, float] = {}
    for epoch in range(args.grow_at_epoch, args.epochs):
        line = []
        for name, (net, opt) in runs.items():
            for group in opt.param_groups:
                group["lr"] = cosine_lr(args.lr, epoch, args.epochs)
            loss = train_epoch(net, train_loader, epoch, opt)
            final[name] = accuracy(net, test_loader)
            line.append(f"{name} loss {loss:.3f} acc {final[name]:.2f}%")
        print(f"epoch {epoch + 1}: " + "; ".join(line))

    grown_acc, ungrown_acc = final["grown"], final["ungrown"]
    verdict = "above" if grown_acc > ungrown_acc else ("equal to" if grown_acc == ungrown_acc else "below")
    print(
        f"after {args.epochs} epochs the grown net ends {verdict} the ungrown one: "
        f"{final['grown']:.2f}% vs {final['ungrown']:.2f}%"
    )
    if args.out is not None:
        surgery.save(grown, args.out, force=True)
        print(f"saved the grown net to {args.out}/ (surgery.load(dir))")
    return {"before": before, "after": after, "grown": final["grown"], "ungrown": final["ungrown"]}


if __name__ == "__main__":
    main()
