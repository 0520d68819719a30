"""xross.analysis.diagnose: flatness under weight noise, prediction entropy, PCA embeddings, and `xross diagnose`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from xross.analysis.diagnose import diagnose, flatness, mean_entropy, net_entropies, perturbed, principal_components
from xross.cohort.grid import Cohort
from xross.run.evaluate import evaluate


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 10, (12,), generator=g)) for _ in range(3)]


def test_flatness_at_noise_zero_is_the_plain_evaluation(cohort: Cohort, batches) -> None:
    plain = evaluate(cohort, batches, 16)
    flat = flatness(cohort, batches, scales=[0.0], draws=3)[0.0]
    for result in plain.paths:
        top1, loss = flat[result.path]
        assert top1 == pytest.approx(result.top1, abs=1e-9)
        with torch.no_grad():
            cohort.eval()
            expected = sum(
                float(F.cross_entropy(cohort.forward_paths(x, [result.path])[result.path], y, reduction="sum"))
                for x, y in batches
            ) / sum(len(y) for _, y in batches)
        assert loss == pytest.approx(expected, rel=1e-6)


def test_noise_scales_with_each_tensors_own_spread_and_leaves_the_cohort(cohort: Cohort) -> None:
    before = {k: v.clone() for k, v in cohort.state_dict().items()}
    noisy = perturbed(cohort, 0.1, torch.Generator().manual_seed(0))
    for (name, p), q in zip(cohort.named_parameters(), noisy.parameters()):
        assert torch.equal(p, before[name])  # the original is untouched
        if p.numel() > 1 and p.numel() >= 64:
            ratio = float((q - p).detach().std() / p.detach().std())
            assert 0.07 < ratio < 0.13, name
        elif p.numel() == 1:
            assert torch.equal(p, q)
    for name, buffer in noisy.named_buffers():  # BatchNorm statistics stay
        assert torch.equal(buffer, before[name])


def test_more_noise_loses_accuracy_on_a_fitted_cohort(cohort: Cohort, batches) -> None:
    flat = flatness(cohort, batches, scales=[0.0, 2.0], draws=2)
    assert all(flat[2.0][p][1] > flat[0.0][p][1] for p in cohort.paths())  # loss grows with heavy noise


def test_mean_entropy_equals_a_hand_computed_reference() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [10.0, -10.0, 0.0]])
    expected = 0.0
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        expected -= sum(math.exp(v) / z * math.log(math.exp(v) / z) for v in row)
    assert mean_entropy(logits) == pytest.approx(expected / 3, rel=1e-12)
    assert mean_entropy(torch.zeros(5, 7)) == pytest.approx(math.log(7), rel=1e-12)


def test_net_entropies_are_each_own_paths(cohort: Cohort, batches) -> None:
    values = net_entropies(cohort, batches)
    cohort.eval()
    with torch.no_grad():
        for i, value in enumerate(values):
            path = cohort.own_path(i)
            logits = torch.cat([cohort.forward_paths(x, [path])[path] for x, _ in batches])
            assert value == pytest.approx(mean_entropy(logits), rel=1e-9)


def test_principal_components_find_the_spread_directions() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 2, generator=g, dtype=torch.float64)
    z, _ = torch.linalg.qr(z - z.mean(0))  # centred, uncorrelated columns, spreads 5 and 2
    z = z * torch.tensor([5.0, 2.0], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    x = torch.cat([z, 1e-3 * torch.randn(200, 4, generator=g, dtype=torch.float64)], 1) @ basis.T + 3.0
    projected = principal_components(x)
    # the same two coordinates, up to sign
    for k in range(2):
        corr = torch.corrcoef(torch.stack([projected[:, k], z[:, k] - z[:, k].mean()]))[0, 1]
        assert abs(float(corr)) > 0.9999


def test_report_noise_drop_is_the_nets_loss_at_the_middle_scale(cohort: Cohort, batches) -> None:
    report = diagnose(cohort, batches, scales=(0.01, 0.02, 0.05, 0.1), draws=2)
    assert report.scales == [0.0, 0.01, 0.02, 0.05, 0.1]
    own = [report.paths.index([i, i]) for i in range(2)]
    expected = sum(report.top1[0][p] - report.top1[3][p] for p in own) / 2  # 0.05 is the middle of the four
    assert report.noise_drop == pytest.approx(expected)
    assert report.entropy == pytest.approx(net_entropies(cohort, batches))


def test_diagnose_command_writes_report_and_plots(cli, tmp_path, cifar10_archive, data_cache) -> None:
    run = tmp_path / "run"
    code = cli(
        "xross", "train", "--nets", "resnet18,resnet18", "--cut", "layer2", "--mode", "dml", "--data",
        str(cifar10_archive), "--subset", "64", "--eval-subset", "40", "--batch-size", "32", "--epochs", "1",
        "--cache-dir", str(data_cache), "--out", str(run), "--eval-every", "0", "--no-augment",
    ).code  # fmt: skip
    assert code == 0
    result = cli("xross", "diagnose", str(run), "--images", "30", "--draws", "1", "--scales", "0.05")
    assert result.code == 0, result.err
    report = json.loads((run / "diagnose.json").read_text())
    assert report["images"] == 30 and report["scales"] == [0.0, 0.05] and len(report["entropy"]) == 2
    assert (run / "flatness.png").stat().st_size > 0 and (run / "embedding.png").stat().st_size > 0
    result = cli("xross", "similarity", str(run), "--images", "30")
    assert result.code == 0, result.err
    cka = json.loads((run / "similarity.json").read_text())["cka"]
    assert set(cka) == {"b0_0v1"} and 0 < cka["b0_0v1"] <= 1
    assert (run / "similarity.png").stat().st_size > 0
    bad = cli("xross", "diagnose", str(run), "--scales", "small")
    assert bad.code == 2 and "--scales" in bad.err and "Traceback" not in bad.err
