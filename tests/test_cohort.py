"""xross.cohort: cohorts of transformers (token boundaries, side values) train and stitch like CNN cohorts."""

from __future__ import annotations

from pathlib import Path

import torch

from xross.cohort import Cohort

VIT = "timm:vit_tiny_patch16_224(img_size=32, patch_size=8, depth=4, embed_dim={}, num_heads=3)"


def test_two_vits_of_different_widths_build_with_token_adapters() -> None:
    cohort = Cohort.build([VIT.format(48), VIT.format(96)], cuts=["blocks.1"], num_classes=10, image_size=32)
    adapter = cohort.adapter(0, 0, 1)
    assert adapter is not None and isinstance(adapter.map, torch.nn.Linear) and adapter.map.weight.shape == (96, 48)
    assert adapter.side_values == 2  # the blocks' attn_mask and is_causal pass through the stitch
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
    from xross.evaluate import EvalResult

    result = EvalResult.load(tmp_path / "run" / "eval.json")
    assert len(result.paths) == 4 and result.samples == 40
    r = cli("xross", "export", tmp_path / "run", "--path", "0,1", "--out", tmp_path / "hybrid")
    assert r.code == 0, r
