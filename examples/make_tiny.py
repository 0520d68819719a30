"""Make the small local things the README's examples need, in a second and without a download.

    python examples/make_tiny.py images data/tiny-cifar            # ImageFolder: train/ and test/, 10 classes
    python examples/make_tiny.py images data/tiny-imagenet --val   # train/ and val/: ImageNet's own layout
    python examples/make_tiny.py images data/tiny-cifar.tar.xz     # the same as an archive (.tar, .tar.gz, .tar.xz)
    python examples/make_tiny.py bert bert-small                   # a BERT classifier saved with save_pretrained
    python examples/make_tiny.py llama llama-small                 # a LLaMA language model (byte vocabulary)
    python examples/make_tiny.py text data/tiny-text               # text files: Python's own standard library

``images`` writes the generated CIFAR-10 stand-in of :mod:`xross.data.synthetic` (32x32
JPEGs of 10 classes named like CIFAR-10's, learnable, deterministic in ``--seed``):
``--train`` and ``--test`` images per class. ``bert`` saves a randomly initialised
``BertForSequenceClassification`` (vocabulary 1000, 4 layers of width 64, 2 labels) in
safetensors, the way ``save_pretrained`` saves any checkpoint; ``hf:bert-small`` then
names it on every command line. ``llama`` saves a ``LlamaForCausalLM`` the same way
(vocabulary 256, so it reads bytes; 2 layers of width 64, 4 query and 2 key-value heads).
``text`` copies ``--files`` source files of the Python standard library on this machine
(a real corpus nobody here wrote; never commit it) into a folder ``--data text:DIR`` reads.
An existing directory is taken as already made and kept as it is; every write is atomic.
"""

from __future__ import annotations

import argparse
import shutil
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from surgery.core.util import atomic_directory
from xross.data.synthetic import pack_archive, write_synthetic

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.xz")
BERT_SMALL = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


def images(root: Path, *, train: int, test: int, val: bool, seed: int) -> Path:
    """The generated dataset at ``root`` (a directory, or an archive by its suffix); ``val``: name the split val/."""
    if root.name.endswith(ARCHIVES):
        with tempfile.TemporaryDirectory() as tmp:
            folder = images(Path(tmp) / "data", train=train, test=test, val=val, seed=seed)
            return pack_archive(folder, root)
    if root.is_dir():
        return root

    def fill(tmp: Path) -> None:
        written = write_synthetic(tmp / "data", train_per_class=train, test_per_class=test, seed=seed)
        for split in ("train", "test"):
            shutil.move(written / split, tmp / ("val" if val and split == "test" else split))
        written.rmdir()

    return atomic_directory(root, fill)


def _saved(directory: Path, model_class: str, config_class: str, config: dict[str, int], seed: int) -> Path:
    """A random-weight ``transformers.<model_class>`` saved with ``save_pretrained`` (safetensors) in ``directory``."""
    import transformers

    if directory.is_dir():
        return directory
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    return atomic_directory(directory, lambda tmp: model.save_pretrained(tmp))


def bert(directory: Path, *, seed: int) -> Path:
    """A random-weight BERT classifier saved with ``save_pretrained`` in ``directory``."""
    return _saved(directory, "BertForSequenceClassification", "BertConfig", BERT_SMALL, seed)


LLAMA_SMALL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def llama(directory: Path, *, seed: int) -> Path:
    """A random-weight LLaMA language model over bytes, saved with ``save_pretrained`` in ``directory``."""
    return _saved(directory, "LlamaForCausalLM", "LlamaConfig", LLAMA_SMALL, seed)


def text(directory: Path, *, files: int) -> Path:
    """``files`` of the standard library's ``.py`` sources (the first in sorted order) copied into ``directory``."""
    if directory.is_dir():
        return directory
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.glob("*.py") if p.is_file())[:files]

    def fill(tmp: Path) -> None:
        for source in sources:
            shutil.copyfile(source, tmp / source.name)

    return atomic_directory(directory, fill)


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    pics = sub.add_parser("images", help="a generated ImageFolder dataset (or an archive of one)")
    pics.add_argument("out", type=Path, help="directory, or archive ending .tar, .tar.gz, .tgz or .tar.xz")
    pics.add_argument("--train", type=int, default=100, help="training images per class")
    pics.add_argument("--test", type=int, default=20, help="evaluation images per class")
    pics.add_argument("--val", action="store_true", help="name the evaluation split val/ (ImageNet's layout)")
    pics.add_argument("--seed", type=int, default=0)
    classifier = sub.add_parser("bert", help="a small random-weight BERT classifier saved with save_pretrained")
    classifier.add_argument("out", type=Path, help="the checkpoint directory")
    classifier.add_argument("--seed", type=int, default=0)
    lm = sub.add_parser("llama", help="a small random-weight LLaMA language model saved with save_pretrained")
    lm.add_argument("out", type=Path, help="the checkpoint directory")
    lm.add_argument("--seed", type=int, default=0)
    corpus = sub.add_parser("text", help="a folder of text: source files of Python's standard library")
    corpus.add_argument("out", type=Path, help="the folder")
    corpus.add_argument("--files", type=int, default=20, help="how many source files")
    args = p.parse_args(argv)
    if args.what == "bert":
        made = bert(args.out, seed=args.seed)
    elif args.what == "llama":
        made = llama(args.out, seed=args.seed)
    elif args.what == "text":
        made = text(args.out, files=args.files)
    else:
        if min(args.train, args.test) <= 0:
            p.error("--train and --test must be positive numbers of images per class")
        made = images(args.out, train=args.train, test=args.test, val=args.val, seed=args.seed)
    print(f"wrote {made}")
    return made


if __name__ == "__main__":
    main()
