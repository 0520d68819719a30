"""XML/DML/KD terms against hand-written references; paths; shared vs per-path computation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import surgery
from xross.cohort import Cohort
from xross.losses import DML, KD, XML, Independent, kl


def tiny(widths: list[int]) -> torch.nn.Module:
    return surgery.build_model("growth.models:small_vgg", widths=widths, num_classes=10, image_size=16)


@pytest.fixture
def cohort() -> Cohort:
    torch.manual_seed(0)
    return Cohort.build([tiny([8, 16]), tiny([12, 16])], cuts=["features.0"], num_classes=10, image_size=16)


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


def test_three_part_paths() -> None:
    torch.manual_seed(0)
    c = Cohort.build(
        [tiny([8, 16, 16]), tiny([12, 16, 24])], cuts=["features.0", "features.1"], num_classes=10, image_size=16
    )
    assert c.num_parts == 3
    assert c.paths() == list(itertools.product(range(2), repeat=3))
    cross = c.cross_paths(0, 1)
    assert len(cross) == 2**3 - 2 and (0, 0, 0) not in cross and (1, 1, 1) not in cross
    assert sorted(c.cross_paths(0, 1, single=True)) == [(0, 0, 1), (0, 1, 0), (1, 0, 0)]
    # adapters only where the shapes differ: 8<->12 channels after part 0; 16 = 16 after part 1
    assert sorted(c.adapters) == ["b0_0to1", "b0_1to0"]
    x = torch.randn(2, 3, 16, 16)
    out = c.forward_paths(x, c.paths())
    assert all(v.shape == (2, 10) for v in out.values())
    # a path equals the composition of its modules
    c.eval()
    assert torch.allclose(c.forward(x, (1, 0, 1)), surgery.Pieces(c.modules_of((1, 0, 1)))(x))
    # normaliser with P = 3: (2^3 - 2)(K - 1) = 6, and all 6 cross paths contribute KL + CE
    y = torch.randint(0, 10, (2,))
    terms = XML().loss(0, c.forward_paths(x, XML().paths(c)), y, c)
    assert len(terms.terms) == 2 + 2 * 6
    assert torch.allclose(terms.total, torch.stack(list(terms.terms.values())).sum() / 6)
    assert len(XML(cross="single").loss(0, c.forward_paths(x, XML().paths(c)), y, c).terms) == 2 + 2 * 3


def test_three_nets_have_all_pair_adapters_and_paths() -> None:
    torch.manual_seed(0)
    c = Cohort.build(
        [tiny([8, 16]), tiny([12, 16]), tiny([16, 16])], cuts=["features.0"], num_classes=10, image_size=16
    )
    assert len(c.paths()) == 9 and len(c.adapters) == 6
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    logits = c.forward_paths(x, XML().paths(c))
    terms = XML().loss(2, logits, y, c)
    assert len(terms.terms) == 2 + 2 * 2 * 2  # two teachers x two cross paths x (KL + CE)
    assert torch.allclose(terms.total, torch.stack(list(terms.terms.values())).sum() / (2 * 2))


@pytest.mark.parametrize("parts", [2, 3])
def test_shared_computation_equals_per_path(parts: int) -> None:
    torch.manual_seed(0)
    widths, cuts = ([8, 16, 16], ["features.0", "features.1"]) if parts == 3 else ([8, 16], ["features.0"])
    c = Cohort.build([tiny(widths), tiny([12, *widths[1:]])], cuts=cuts, num_classes=10, image_size=16).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    mode = XML()
    params = list(c.parameters())

    def losses_and_grads(shared: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits = c.forward_paths(x, mode.paths(c), shared=shared)
        totals = [mode.loss(i, logits, y, c).total for i in range(2)]
        grads = torch.autograd.grad(sum(totals), params, allow_unused=True)
        return totals, [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]

    shared_losses, shared_grads = losses_and_grads(True)
    naive_losses, naive_grads = losses_and_grads(False)
    for a, b in zip(shared_losses, naive_losses):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(shared_grads, naive_grads):  # same ops, summed in another order
        assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1e-12)
    assert any(g.abs().sum() > 0 for g in shared_grads)


def test_export_path_is_a_saveable_stitched_model(cohort: Cohort, tmp_path) -> None:
    cohort.eval()
    x = torch.randn(2, 3, 16, 16)
    hybrid = cohort.export_path((1, 0))
    assert torch.equal(hybrid(x), cohort.forward(x, (1, 0)))
    surgery.save(hybrid, tmp_path / "h")
    assert torch.equal(surgery.load(tmp_path / "h").eval()(x), hybrid(x))


def test_bad_cohorts() -> None:
    with pytest.raises(surgery.UserError, match="same number of cuts"):
        Cohort.build(["resnet18", "resnet34"], cuts=[["layer1", "layer2"], ["layer2"]], num_classes=10)
    with pytest.raises(surgery.UserError, match="closest: layer2"):
        Cohort.build(["resnet18", "resnet34"], cuts=["layer22"], num_classes=10)
    inside = Cohort.build(
        ["resnet18", "resnet34"], cuts=["layer2.0.conv1"], num_classes=10
    )  # the block input crosses too
    assert inside.adapter(0, 0, 1) is None and len(inside.forward_paths(torch.randn(2, 3, 32, 32), inside.paths())) == 4
    with pytest.raises(surgery.UserError, match="hands over 1 values but the down piece takes 2"):
        Cohort.build(["resnet18", "resnet34"], cuts=[["layer2"], ["layer2.0.conv1"]], num_classes=10)
    with pytest.raises(surgery.UserError, match="unknown cross"):
        XML(cross="some")


def test_sharded_evaluation_with_summed_counts_equals_whole(cohort: Cohort) -> None:
    from xross.evaluate import evaluate

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 3, 16, 16, generator=g), torch.randint(0, 10, (5,), generator=g)) for _ in range(5)]
    whole = evaluate(cohort, batches, 16)
    # two "ranks": rank 1 sees batches 1, 3; rank 0 sees 0, 2, 4 and receives rank 1's counts in the reduce
    seen: list[torch.Tensor] = []
    empty = (torch.empty(0, 3, 16, 16), torch.empty(0, dtype=torch.int64))  # a rank's part of a short last batch
    evaluate(cohort, [*batches[1::2], empty], 16, reduce=lambda t: seen.append(t.clone()) or t)
    sharded = evaluate(cohort, batches[0::2], 16, reduce=lambda t: t + seen[0])
    assert sharded.samples == whole.samples == 25
    assert sharded == whole
    assert len({r.top1 for r in whole.paths}) > 1  # the paths differ, so a mixed-up unpacking would show
