"""Text for causal language models: ``--data text:DIR`` as fixed-length windows of token ids.

The corpus is every ``*.txt``, ``*.py`` and ``*.md`` file under DIR (recursively, in sorted path
order); a file that cannot be read, holds a NUL byte or is not UTF-8 is skipped (binary). It is
tokenised as bytes (vocabulary 256) or, with ``tokenizer="hf:DIR"``, by a tokenizer saved with
``save_pretrained`` (read with ``local_files_only``: never a download), into one stream of tokens.
The stream is cut into consecutive windows of ``seq_len + 1`` tokens (a window may span two files);
a window's inputs are its first ``seq_len`` tokens and its targets the next token of each. The last
window is padded: its missing inputs are 0, its missing targets ``UNLABELED`` (-1, never scored). So
every token of the corpus is in exactly one window, and the held-out split is **by window**: a
seeded choice of ``eval_fraction`` of them (at least one).

>>> import pathlib, tempfile
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> _ = (root / "a.txt").write_text("hello world")
>>> train, test, vocab = load_text(f"text:{root}", seq_len=4, eval_fraction=0.5, seed=0)
>>> vocab, len(train) + len(test), train.inputs.shape[1], train.split, test.split
(256, 3, 4, 'train', 'held-out')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xross.data.augment import seeded_generator
from xross.data.labels import UNLABELED
from xross.data.loader import BatchLoader, shard
from xross.data.sources import TEXT_PREFIX
from xross.errors import XrossError

__all__ = ["TEXT_SUFFIXES", "TokenLoader", "TokenWindows", "load_text", "load_tokenizer", "text_files", "windows"]

TEXT_SUFFIXES = (".txt", ".py", ".md")
BYTE_VOCAB = 256

Tokenizer = Callable[[bytes], list[int]]


@dataclasses.dataclass
class TokenWindows:
    """Windows of token ids: ``tokens`` ``(N, seq_len + 1)`` (-1 where the last window is padded)."""

    tokens: torch.Tensor
    split: str = "train"

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def inputs(self) -> torch.Tensor:
        """What the nets read: ``(N, seq_len)`` ids (0 where padded)."""
        return self.tokens[:, :-1].clamp_min(0)

    @property
    def targets(self) -> torch.Tensor:
        """The next token of each input position: ``(N, seq_len)`` ids, ``UNLABELED`` where there is none."""
        return self.tokens[:, 1:]

    # what BatchLoader reads of a split
    images = inputs
    labels = targets


def text_files(root: Path) -> list[Path]:
    """The text files under ``root`` (recursively, :data:`TEXT_SUFFIXES`), in sorted path order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())


def read_texts(root: Path) -> list[bytes]:
    """The bytes of each readable UTF-8 text file under ``root``; binary or unreadable ones are skipped."""
    texts = []
    for path in text_files(root):
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if b"\0" not in data:
            texts.append(data)
    return texts


def load_tokenizer(spec: str | None) -> tuple[Tokenizer, int]:
    """``(encode, vocabulary size)``: bytes for None, else ``hf:DIR`` (a local save_pretrained directory)."""
    if spec is None:
        return list, BYTE_VOCAB
    directory = Path(spec.removeprefix("hf:")).expanduser()
    if not spec.startswith("hf:") or not directory.is_dir():
        raise XrossError(f"tokenizer '{spec}' is not hf:DIR of an existing directory written by save_pretrained")
    try:
        import transformers

        tok: Any = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a damaged directory fails in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise XrossError(f"cannot read tokenizer {directory}: {first}; save one with save_pretrained") from None

    def encode(data: bytes) -> list[int]:
        return list(tok(data.decode("utf-8"), add_special_tokens=False)["input_ids"])

    return encode, len(tok)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``stream`` cut into consecutive windows of ``seq_len + 1`` tokens, the last padded with -1.

    >>> windows(torch.arange(7), 2).tolist()
    [[0, 1, 2], [3, 4, 5], [6, -1, -1]]
    """
    width = seq_len + 1
    n = -(-len(stream) // width)
    out = torch.full((n * width,), UNLABELED, dtype=torch.int64)
    out[: len(stream)] = stream
    return out.view(n, width)


def held_out(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Which of ``n`` windows are held out: a seeded choice of ``round(n * fraction)`` (at least one, never all)."""
    k = min(max(1, round(n * fraction)), n - 1)
    chosen = torch.randperm(n, generator=seeded_generator("text-split", seed))[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return mask


def load_text(
    source: str, seq_len: int, *, tokenizer: str | None = None, eval_fraction: float = 0.1, seed: int = 0
) -> tuple[TokenWindows, TokenWindows, int]:
    """(training windows, held-out windows, vocabulary size) of ``text:DIR``."""
    root = Path(source.removeprefix(TEXT_PREFIX)).expanduser()
    if not source.startswith(TEXT_PREFIX) or not root.is_dir():
        raise XrossError(f"'{source}' is not text:DIR of an existing folder of {', '.join(TEXT_SUFFIXES)} files")
    encode, vocab = load_tokenizer(tokenizer)
    texts = read_texts(root)
    if not texts:
        raise XrossError(f"no readable text files ({', '.join(TEXT_SUFFIXES)}) under {root}; add some")
    if tokenizer is None:  # bytes: the ids are the bytes themselves
        stream = torch.frombuffer(bytearray(b"".join(texts)), dtype=torch.uint8).to(torch.int64)
    else:
        stream = torch.tensor([t for text in texts for t in encode(text)], dtype=torch.int64)
    tokens = windows(stream, seq_len)
    if len(tokens) < 2:
        raise XrossError(
            f"{root} holds {len(stream)} tokens: one window of {seq_len + 1}; training and evaluation need two "
            "(add text or lower --seq-len)"
        )
    mask = held_out(len(tokens), eval_fraction, seed)
    return TokenWindows(tokens[~mask], "train"), TokenWindows(tokens[mask], "held-out"), vocab


class TokenLoader(BatchLoader):
    """:class:`~xross.data.loader.BatchLoader`'s epochs (order, shards, resumption) of ``(inputs, targets)``
    windows: nothing to augment or normalise."""

    def __init__(self, data: TokenWindows, batch_size: int, *, train: bool = True, **kwargs: Any) -> None:
        kwargs.pop("augment", None)
        if train and len(data) < batch_size:
            raise XrossError(
                f"{len(data)} training windows make no full batch of {batch_size}; lower --batch-size or --seq-len, "
                "or add text"
            )
        super().__init__(data, batch_size, train=train, **kwargs)  # type: ignore[arg-type]  # it reads images and labels

    def _batch(self, order: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = order[step * self.batch_size : (step + 1) * self.batch_size]
        index = batch[shard(len(batch), self.rank, self.world_size)]
        return self.images[index], self.labels[index]
