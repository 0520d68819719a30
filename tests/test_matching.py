"""surgery.pieces.matching: matching the channels of two networks recovers a shuffle, also between unequal counts."""

from __future__ import annotations

import pytest
import torch

import surgery


@pytest.mark.parametrize("method", ["hungarian", "gale-shapley"])
@pytest.mark.parametrize("metric", ["corr", "cos", "l2"])
def test_match_channels_recovers_a_shuffle(method: str, metric: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 24, 4, 4, generator=g) * torch.rand(24, generator=g).view(1, -1, 1, 1)
    perm = torch.randperm(24, generator=g)
    b = a[:, perm] + 0.01 * torch.randn(a[:, perm].shape, generator=g)
    m = surgery.match_channels(a, b, method=method, metric=metric)
    assert torch.equal(perm[m], torch.arange(24))


def test_match_channels_unequal_counts() -> None:
    a = torch.randn(128, 6, 2, 2)
    b = torch.cat([a[:, [2, 0]], torch.randn(128, 1, 2, 2)], dim=1)  # B has 3 channels
    m = surgery.match_channels(a, b)
    assert m[2] == 0 and m[0] == 1 and (m == -1).sum() == 3
