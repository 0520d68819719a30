"""xross.cohort.grid: cohorts of transformers (token boundaries, side values) train and stitch like CNN cohorts.

And on small CNN cohorts: the paths and adapters of 2 or 3 parts and nets, shared computation of the
paths equals per-path computation, a path exports as a stitched model, bad cohorts are refused.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from helpers import tiny

import surgery
from xross.cohort.grid import Cohort
from xross.methods.objectives import XML

VIT = "timm:vit_tiny_patch16_224(img_size=32, patch_size=8, depth=4, embed_dim={}, num_heads=3)"


def test_two_vits_of_different_widths_build_with_token_adapters() -> None:
    cohort = Cohort.build([VIT.format(48), VIT.format(96)], cuts=["blocks.1"], num_classes=10, image_size=32)
    adapter = cohort.adapter(0, 0, 1)
    assert adapter is not None and isinstance(adapter.map, torch.nn.Linear) and adapter.map.weight.shape == (96, 48)
    assert adapter.side_values == 0  # the blocks' attn_mask (None) and is_causal stay inside the pieces: constants
    out = cohort.forward_paths(torch.randn(3, 3, 32, 32), cohort.paths())
    assert {p: tuple(v.shape) for p, v in out.items()} == {p: (3, 10) for p in cohort.paths()}


def test_xross_trains_a_two_vit_cohort_for_an_epoch(cli, synthetic_folder: Path, tmp_path: Path) -> None:
    r = cli(
        "xross",
        "train",
        "--nets",
        f"{VIT.format(48)},{VIT.format(96)}",
        "--cut",
        "blocks.1",
        "--mode",
        "xml",
        "--data",
        synthetic_folder,
        "--subset",
        "160",
        "--eval-subset",
        "40",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run",
        "--no-progress",
    )
    assert r.code == 0, r
    from xross.run.evaluate import EvalResult

    result = EvalResult.load(tmp_path / "run" / "eval.json")
    assert len(result.paths) == 4 and result.samples == 40
    r = cli("xross", "export", tmp_path / "run", "--path", "0,1", "--out", tmp_path / "hybrid")
    assert r.code == 0, r


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


@pytest.mark.parametrize("net", ["resnet18", "resnet34"])
def test_research_geometry_hands_over_128x8x8_at_layer2(net: str) -> None:
    """64x64 images through the ImageNet stem (stride 2 + max-pool) and layer2 (stride 2): 128 x 8 x 8."""
    from xross.run.config import TrainConfig
    from xross.run.directory import build_cohort

    cfg = TrainConfig(nets=[net, "resnet18"], cuts=["layer2"], image_size=64, num_classes=10, stem="imagenet")
    cohort = build_cohort(cfg, torch.device("cpu"), False)
    values: dict = {}
    with torch.no_grad():
        cohort.eval()
        cohort.forward_paths(torch.randn(2, 3, 64, 64), [cohort.own_path(0)], prefixes=values)
    assert values[(0,)].shape == (2, 128, 8, 8)
