"""Causal language models in a cohort: their example input, cuts at decoder-layer boundaries, and checks.

A net of a ``causal_lm`` run is called as users call it, ``net(input_ids)`` (full windows: no mask), and
returns an output with ``.logits`` ``(B, T, V)`` (:func:`xross.cohort.logits.as_logits`). A cut
``block:N`` is the boundary after decoder layer N (0-based) of each net, ``block:half`` the one after
its middle layer; other names are module paths as for any net (``model.layers.0``).

>>> import torch, surgery
>>> net = surgery.build_model('hf:LlamaForCausalLM', config={"hidden_size": 16, "num_hidden_layers": 4,
...     "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32, "vocab_size": 256})
>>> resolve_cuts(net, ["block:half", "block:2"])
['model.layers.1', 'model.layers.2']
>>> check_lm(net, vocab=300, seq_len=16, name="the net")
Traceback (most recent call last):
...
xross.errors.XrossError: the net predicts 256 tokens but the tokenizer has 300: give it vocab_size >= 300 in its config
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from surgery.graph.inputs import Example
from xross.data.labels import UNLABELED
from xross.errors import XrossError

__all__ = ["BLOCK", "TextNets", "check_lm", "decoder_layers", "per_token", "resolve_cuts", "token_example"]

BLOCK = "block:"


@dataclasses.dataclass(frozen=True)
class TextNets:
    """What a cohort of causal LMs is built for: the tokenizer's vocabulary, the window length and the dtype
    (a captured decoder asserts the dtype of its rotary tables: it is cut in the dtype it trains in)."""

    vocab: int
    seq_len: int
    dtype: torch.dtype = torch.float32


def token_example(seq_len: int, device: torch.device | str = "cpu") -> Example:
    """What an LM of a cohort is cut and counted on: one window of ``seq_len`` token ids, positional."""
    return Example((torch.zeros(1, seq_len, dtype=torch.int64, device=device),), {})


def decoder_layers(net: nn.Module) -> tuple[str, int]:
    """The module path of a decoder's list of layers and how many it has (the first ``ModuleList`` as long as
    its config's ``num_hidden_layers``, else the longest)."""
    lists = [(name, len(m)) for name, m in net.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    depth = getattr(getattr(net, "config", None), "num_hidden_layers", None)
    found = [item for item in lists if item[1] == depth] or sorted(lists, key=lambda item: -item[1])
    if not found:
        raise XrossError(f"{type(net).__name__} has no list of layers to cut at block:N; name a module to cut")
    return found[0]


def resolve_cuts(net: nn.Module, cuts: list[str]) -> list[str]:
    """``cuts`` with each ``block:N`` / ``block:half`` replaced by the module path of that decoder layer."""
    out = []
    for cut in cuts:
        if not cut.startswith(BLOCK):
            out.append(cut)
            continue
        prefix, n = decoder_layers(net)
        which = cut[len(BLOCK) :]
        index = n // 2 - 1 if which == "half" else int(which) if which.isdigit() else -1
        if not 0 <= index < n - 1:
            raise XrossError(
                f"cut '{cut}': {type(net).__name__} has {n} layers ({prefix}); give block:N with N in 0..{n - 2} "
                "(the boundary after layer N) or block:half"
            )
        out.append(f"{prefix}.{index}")
    return out


def _config_value(net: nn.Module, *names: str) -> Any:
    config = getattr(net, "config", None)
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def check_lm(net: nn.Module, vocab: int, seq_len: int, name: str) -> nn.Module:
    """``net`` ready to train as a causal LM on ``vocab`` tokens in windows of ``seq_len`` (no key-value cache),
    or one line naming what does not fit and the fix."""
    embeddings = getattr(net, "get_output_embeddings", None)
    head = embeddings() if callable(embeddings) else None
    outputs = getattr(head, "out_features", None) or _config_value(net, "vocab_size")
    if outputs is None:
        raise XrossError(f"{name} ({type(net).__name__}) is not a causal LM with an output vocabulary (vocab_size)")
    if outputs < vocab:
        raise XrossError(
            f"{name} predicts {outputs} tokens but the tokenizer has {vocab}: "
            f"give it vocab_size >= {vocab} in its config"
        )
    positions = _config_value(net, "n_positions", "max_position_embeddings")
    if positions is not None and positions < seq_len:
        raise XrossError(
            f"{name} takes {positions} positions but --seq-len is {seq_len}: lower --seq-len or give it more "
            "(n_positions / max_position_embeddings)"
        )
    config = getattr(net, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False  # type: ignore[union-attr]  # training on full windows: no cache to return
    return net


def per_token(logits: dict[Any, torch.Tensor], targets: torch.Tensor) -> tuple[dict[Any, torch.Tensor], torch.Tensor]:
    """A causal LM's logits ``(B, T, V)`` and next-token targets ``(B, T)`` as ``(N, V)`` and ``(N,)`` over the
    N positions that have a target: every term above is then a mean over tokens.

    >>> logits, targets = {(0,): torch.randn(2, 3, 5)}, torch.tensor([[1, 2, 3], [4, UNLABELED, UNLABELED]])
    >>> flat, y = per_token(logits, targets)
    >>> tuple(flat[(0,)].shape), y.tolist()
    ((4, 5), [1, 2, 3, 4])
    """
    keep = (targets != UNLABELED).flatten()
    return {p: v.reshape(-1, v.shape[-1])[keep] for p, v in logits.items()}, targets.flatten()[keep]
