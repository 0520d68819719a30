"""xross.methods.objectives: the XML, DML, KD, independent and distillation terms against hand-written references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny

from xross.cohort.grid import Cohort
from xross.methods.objectives import DML, KD, XML, DistillLoss, Independent, kl, peer_kl, soft_cross_entropy


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g)


def ref_kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_s), summed over classes, mean over the batch, written out."""
    pt, ps = t_logits.softmax(1), s_logits.softmax(1)
    return (pt * (pt.log() - ps.log())).sum(1).mean()


def test_kl_matches_definition_and_detaches_teacher() -> None:
    t = torch.randn(5, 7, requires_grad=True)
    s = torch.randn(5, 7, requires_grad=True)
    value = kl(t, s)
    assert torch.allclose(value, ref_kl(t, s), atol=1e-6)
    value.backward()
    assert t.grad is None and s.grad is not None


def test_xml_terms_equal_hand_written_reference(cohort: Cohort, batch) -> None:
    x, y = batch
    cohort.eval()
    # hand-written: halves, adapters and the four paths
    up0, up1 = cohort.part(0, 0)(x), cohort.part(1, 0)(x)
    own0, own1 = cohort.part(0, 1)(up0), cohort.part(1, 1)(up1)
    up_mimic = cohort.part(1, 1)(cohort.adapters["b0_0to1"](up0))  # student 0's up -> teacher 1's down
    down_mimic = cohort.part(0, 1)(cohort.adapters["b0_1to0"](up1))  # teacher 1's up -> student 0's down
    logits = cohort.forward_paths(x, XML().paths(cohort))
    assert torch.allclose(logits[(0, 1)], up_mimic, atol=1e-6) and torch.allclose(logits[(1, 0)], down_mimic, atol=1e-6)

    terms = XML().loss(0, logits, y, cohort)
    expected = {
        "ce": F.cross_entropy(own0, y),
        "kl": ref_kl(own1, own0),
        "kl@0-1": ref_kl(own1, up_mimic),
        "ce@0-1": F.cross_entropy(up_mimic, y),
        "kl@1-0": ref_kl(own1, down_mimic),
        "ce@1-0": F.cross_entropy(down_mimic, y),
    }
    assert set(terms.terms) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(terms.terms[name], value, atol=1e-5), name
    # (CE_i + KL_i + KL_up + KL_down + CE_up + CE_down) / (2 (K-1)) with K = 2
    assert torch.allclose(terms.total, sum(expected.values()) / 2, atol=1e-5)

    # student 1 sees the same cross paths with roles swapped: its targets are net 0's predictions
    terms1 = XML().loss(1, logits, y, cohort)
    assert torch.allclose(terms1.terms["kl@0-1"], ref_kl(own0, up_mimic), atol=1e-5)
    assert torch.allclose(terms1.terms["kl@1-0"], ref_kl(own0, down_mimic), atol=1e-5)


def test_dml_kd_independent_formulas(cohort: Cohort, batch) -> None:
    x, y = batch
    cohort.eval()
    logits = cohort.forward_paths(x, DML().paths(cohort))
    own0, own1 = logits[(0, 0)], logits[(1, 1)]
    assert torch.allclose(
        DML().loss(0, logits, y, cohort).total, 0.5 * F.cross_entropy(own0, y) + 0.5 * ref_kl(own1, own0), atol=1e-6
    )
    assert torch.allclose(Independent().loss(1, logits, y, cohort).total, F.cross_entropy(own1, y), atol=1e-6)
    teacher, T, a = torch.randn(6, 10), 3.0, 0.3
    expected = a * F.cross_entropy(own0, y) + (1 - a) * T**2 * ref_kl(teacher / T, own0 / T)
    assert torch.allclose(KD(temperature=T, alpha=a).loss(0, logits, y, cohort, teacher).total, expected, atol=1e-5)
    smooth = DML(label_smoothing=0.1).loss(0, logits, y, cohort).terms["ce"]
    assert torch.allclose(smooth, F.cross_entropy(own0, y, label_smoothing=0.1), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_distill_loss_equals_written_out_soft_and_hard_terms(temperature: float) -> None:
    g = torch.Generator().manual_seed(2)
    student = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teachers = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    labels = torch.randint(0, 7, (5,), generator=g)
    q = sum((t / temperature).softmax(1) for t in teachers) / 3  # the teachers' mean softmax at T
    log_p = (student / temperature).softmax(1).log()
    soft = -(q * log_p).sum(1).mean() * temperature**2
    hard = -(student.softmax(1).log()[torch.arange(5), labels]).mean()

    only_soft = DistillLoss(temperature=temperature)(student, q, labels)
    assert set(only_soft.terms) == {"soft"}  # MEAL V2: no one-hot labels
    assert torch.allclose(only_soft.total, soft, rtol=1e-12)
    mixed = DistillLoss(temperature=temperature, soft_weight=0.7, hard_weight=0.3)(student, q, labels)
    assert torch.allclose(mixed.total, 0.7 * soft + 0.3 * hard, rtol=1e-12)
    assert torch.allclose(mixed.terms["ce"], hard, rtol=1e-12)

    # soft cross-entropy and KL to q differ by q's entropy alone: the same gradient
    (g_ce,) = torch.autograd.grad(soft_cross_entropy(student, q, temperature), student)
    kl_q = (q * (q.log() - log_p)).sum(1).mean()
    (g_kl,) = torch.autograd.grad(kl_q, student)
    assert torch.allclose(g_ce, g_kl, rtol=1e-10)
    assert soft_cross_entropy(student, q.requires_grad_(), temperature).grad_fn is not None
    (g_q,) = torch.autograd.grad(soft_cross_entropy(student, q, temperature), q, allow_unused=True)
    assert g_q is None  # the target is detached


def test_peer_target_ensemble_is_kl_to_the_peers_mean_softmax() -> None:
    torch.manual_seed(0)
    c = Cohort.build(
        [tiny([8, 16]), tiny([12, 16]), tiny([16, 16])], cuts=["features.0"], num_classes=10, image_size=16
    )
    c.eval()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 10, (5,))
    logits = c.forward_paths(x, XML().paths(c))
    own = [logits[c.own_path(i)] for i in range(3)]
    mean_peers = (own[1].softmax(1) + own[2].softmax(1)) / 2
    ensemble_kl = (mean_peers * (mean_peers.log() - own[0].log_softmax(1))).sum(1).mean()
    assert torch.allclose(peer_kl(0, logits, c, "ensemble"), ensemble_kl, atol=1e-6)
    assert torch.allclose(
        peer_kl(0, logits, c, "mean"), (ref_kl(own[1], own[0]) + ref_kl(own[2], own[0])) / 2, atol=1e-6
    )
    # the ensemble target has the lower entropy term, so its KL is at most the mean KL (convexity)
    assert float(peer_kl(0, logits, c, "ensemble").detach()) <= float(peer_kl(0, logits, c, "mean").detach()) + 1e-6
    dml = DML(peer_target="ensemble").loss(0, logits, y, c)
    assert torch.allclose(dml.total, 0.5 * F.cross_entropy(own[0], y) + 0.5 * ensemble_kl, atol=1e-6)
    assert torch.allclose(XML(peer_target="ensemble").loss(0, logits, y, c).terms["kl"], ensemble_kl, atol=1e-6)


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_cross_weight_scales_only_the_cross_path_terms(cohort: Cohort, batch, weight: float) -> None:
    x, y = batch
    cohort.eval()
    logits = cohort.forward_paths(x, XML().paths(cohort))
    terms = XML(cross_weight=weight).loss(0, logits, y, cohort)
    assert terms.terms.keys() == XML().loss(0, logits, y, cohort).terms.keys()
    own = terms.terms["ce"] + terms.terms["kl"]
    cross = sum(v for k, v in terms.terms.items() if "@" in k)
    assert torch.allclose(terms.total, (own + weight * cross) / 2, atol=1e-6)
