"""xross.analysis.similarity: linear CKA against a hand-written reference, and per cut of a cohort."""

from __future__ import annotations

import pytest
import torch

from xross.analysis.similarity import boundary_features, cohort_cka, linear_cka, loss_term_curves
from xross.cohort.grid import Cohort


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC form with the centring matrix H: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), written out."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, lg = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(k, lg) / torch.sqrt(hsic(k, k) * hsic(lg, lg)))


def test_linear_cka_equals_the_hand_computed_reference() -> None:
    x = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [2.0, 2.0, 0.0], [-1.0, 0.5, 1.0], [0.0, -2.0, 3.0]])
    y = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0], [1.0, 1.0], [-2.0, 0.0]])
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 3, 4, 4, generator=g), torch.randn(40, 7, generator=g)
    assert linear_cka(a, b) == pytest.approx(reference_cka(a.flatten(1), b), abs=1e-12)


def test_linear_cka_is_one_under_rotation_and_isotropic_scaling() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 16, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 0.3 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-12)  # and a shift
    stretch = torch.diag(torch.linspace(0.1, 10, 16, dtype=torch.float64))
    assert linear_cka(x, x @ stretch) < 0.99  # not invariant to an anisotropic scaling
    assert linear_cka(x, torch.randn(60, 16, generator=g, dtype=torch.float64)) < 0.5


def test_cohort_cka_compares_each_pair_at_each_cut(cohort: Cohort) -> None:
    images = [torch.randn(10, 3, 16, 16) for _ in range(2)]
    feats = boundary_features(cohort, images)
    assert feats[0, 0].shape == (20, 8, 8, 8) and feats[1, 0].shape == (20, 12, 8, 8)
    values = cohort_cka(cohort, images)
    assert set(values) == {"b0_0v1", "b0_0to1", "b0_1to0"}
    assert values["b0_0v1"] == pytest.approx(linear_cka(feats[0, 0], feats[1, 0]))
    cohort.eval()
    with torch.no_grad():
        handed = cohort.adapter(0, 0, 1)(feats[0, 0])
    assert values["b0_0to1"] == pytest.approx(linear_cka(handed, feats[1, 0]), abs=1e-9)


def test_loss_term_curves_separate_own_and_cross_terms() -> None:
    steps = [
        {"global_step": 1.0, "ce0": 2.0, "kl0": 0.1, "cross_ce0": 2.5, "cross_kl0": 0.3, "ce1": 2.1},
        {"global_step": 2.0, "ce0": 1.5},
    ]
    curves = loss_term_curves(steps, 2)
    assert curves["ce", 0] == [(1.0, 2.0), (2.0, 1.5)] and curves["cross_ce", 0] == [(1.0, 2.5)]
    assert ("cross_ce", 1) not in curves and curves["ce", 1] == [(1.0, 2.1)]
