"""Match the channels of two networks at a boundary from their activations ("XML_m").

Two independently trained networks store the same feature in different channels.
Given the boundary activations of both on the same inputs, find which channel of B
corresponds to each channel of A; then :func:`surgery.permute_channels` reorders B
(without changing its function) or :func:`surgery.adapter` starts from the matching.

>>> import torch, surgery
>>> a = torch.randn(64, 8, 4, 4)
>>> perm = torch.randperm(8)
>>> b = a[:, perm]                                     # B holds A's channels shuffled
>>> m = surgery.match_channels(a, b)
>>> torch.equal(b[:, m], a)
True
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from surgery.core.errors import SurgeryError

METHODS = ("hungarian", "gale-shapley")
METRICS = ("corr", "cos", "l2")


def _per_channel(feats: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) or (N, ..., C) token features -> (C, samples) in float64."""
    if feats.dim() < 2:
        raise SurgeryError(f"features must be (N, C, ...) activations, got shape {tuple(feats.shape)}")
    f = feats.detach().to(torch.float64)
    return f.transpose(0, 1).reshape(f.shape[1], -1)


def similarity(
    feats_a: torch.Tensor, feats_b: torch.Tensor, metric: str = "corr", standardize: bool = True
) -> torch.Tensor:
    """(C_a, C_b) similarity of channels (higher is more alike)."""
    if metric not in METRICS:
        raise SurgeryError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    a, b = _per_channel(feats_a), _per_channel(feats_b)
    if a.shape[1] != b.shape[1]:
        raise SurgeryError(f"features must come from the same inputs: {a.shape[1]} vs {b.shape[1]} values per channel")
    if standardize or metric == "corr":
        a = (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True).clamp_min(1e-12)
        b = (b - b.mean(1, keepdim=True)) / b.std(1, keepdim=True).clamp_min(1e-12)
    if metric == "corr":
        return a @ b.T / (a.shape[1] - 1)
    if metric == "cos":
        return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    return -torch.cdist(a, b)


def _gale_shapley(sim: np.ndarray) -> tuple[np.ndarray, int]:
    """Stable matching with A's channels proposing; returns (match of each A channel or -1, rounds)."""
    n_a, n_b = sim.shape
    prefs = np.argsort(-sim, axis=1)  # each A channel's B channels, best first
    rank_b = np.argsort(np.argsort(-sim, axis=0), axis=0)  # rank_b[a, b]: how much b likes a (0 best)
    nxt = np.zeros(n_a, dtype=np.int64)
    holder = np.full(n_b, -1, dtype=np.int64)
    free = list(range(n_a))
    rounds = 0
    while free:
        rounds += 1
        still_free = []
        for a in free:
            if nxt[a] >= n_b:
                continue  # rejected everywhere (only when n_a > n_b)
            b = prefs[a, nxt[a]]
            nxt[a] += 1
            cur = holder[b]
            if cur < 0:
                holder[b] = a
            elif rank_b[a, b] < rank_b[cur, b]:
                holder[b] = a
                still_free.append(cur)
            else:
                still_free.append(a)
        free = still_free
    match = np.full(n_a, -1, dtype=np.int64)
    for b, proposer in enumerate(holder):
        if proposer >= 0:
            match[proposer] = b
    return match, rounds


def match_channels(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    method: str = "hungarian",
    metric: str = "corr",
    standardize: bool = True,
) -> torch.Tensor:
    """For each channel c of A, the channel ``m[c]`` of B that matches it (``-1``: none left).

    Args:
        feats_a, feats_b: boundary activations ``(N, C, ...)`` of both networks on the
            same N inputs (channel dimension 1).
        method: ``"hungarian"`` (optimal total similarity) or ``"gale-shapley"``
            (stable matching, A proposes).
        metric: ``"corr"`` (Pearson), ``"cos"`` (cosine) or ``"l2"`` (negative distance).
        standardize: divide each channel by its standard deviation (after centring) first.

    With equal channel counts ``m`` is a permutation: ``feats_b[:, m]`` is aligned to A
    and ``surgery.permute_channels(model_b, at, m)`` makes model B's channels follow A's.

    >>> import torch, surgery
    >>> a = torch.randn(100, 4)
    >>> b = a[:, [2, 0, 3, 1]]  # B holds A's channels shuffled
    >>> m = surgery.match_channels(a, b)
    >>> m.tolist(), torch.equal(b[:, m], a)
    ([1, 3, 0, 2], True)
    """
    if method not in METHODS:
        raise SurgeryError(f"unknown matching method '{method}'; choose one of {', '.join(METHODS)}")
    sim = similarity(feats_a, feats_b, metric, standardize).cpu().numpy()
    if method == "hungarian":
        rows, cols = linear_sum_assignment(sim, maximize=True)
        match = np.full(sim.shape[0], -1, dtype=np.int64)
        match[rows] = cols
    else:
        match, _ = _gale_shapley(sim)
    return torch.from_numpy(match)
