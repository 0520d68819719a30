"""surgery.pieces.adapters: adapters between values of different shapes, and stitching pieces of different networks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import surgery
from surgery.pieces.split import suggest_splits


def test_stitch_resnet18_up_with_resnet50_down() -> None:
    x = torch.randn(2, 3, 64, 64)
    a = surgery.cut(surgery.build_model("resnet18").eval(), "layer2", x)
    b = surgery.cut(surgery.build_model("resnet50").eval(), "layer2", x)
    hybrid = surgery.stitch(a[0], b[1], x).eval()
    assert len(hybrid) == 3
    ad = hybrid[1]
    assert isinstance(ad, surgery.Adapter)
    assert (ad.map.in_channels, ad.map.out_channels) == (128, 512)
    assert ad.in_shape == (128, 8, 8) and ad.out_shape == (512, 8, 8)
    with torch.no_grad():
        assert hybrid[0](x).shape == (2, 128, 8, 8)
        assert hybrid(x).shape == (2, 1000)
    # and the other way round, with batchnorm in the adapter
    back = surgery.stitch(b[0], a[1], x, batchnorm=True).eval()
    assert back[1].map.out_channels == 128 and isinstance(back[1].norm, torch.nn.BatchNorm2d)
    assert back(x).shape == (2, 1000)


def test_stitch_same_shapes_needs_no_adapter_and_saves(tmp_path: Path) -> None:
    x = torch.randn(1, 3, 32, 32)
    a = surgery.cut(surgery.build_model("resnet18", num_classes=10).eval(), "layer2", x)
    b = surgery.cut(surgery.build_model("resnet34", num_classes=10).eval(), "layer2", x)
    hybrid = surgery.stitch(a[0], b[1], x).eval()
    assert len(hybrid) == 2
    with torch.no_grad():
        assert torch.equal(hybrid(x), b[1](a[0](x)))
    with_adapter = surgery.stitch(b[0], surgery.stitch(a[0], a[1], x)[1:], x)
    assert len(with_adapter) == 2
    surgery.save(hybrid, tmp_path / "h")
    assert torch.equal(surgery.load(tmp_path / "h").eval()(x), hybrid(x))


def test_adapter_inits_and_resizing() -> None:
    ident = surgery.adapter((16, 8, 8), (16, 8, 8))
    x = torch.rand(2, 16, 8, 8)  # non-negative, as after a ReLU
    assert torch.equal(ident(x), x)
    down = surgery.adapter((16, 8, 8), (32, 4, 4))
    assert down(x).shape == (2, 32, 4, 4) and isinstance(down.pre, torch.nn.AdaptiveAvgPool2d)
    up = surgery.adapter((16, 4, 4), (8, 8, 8))
    assert up(torch.rand(2, 16, 4, 4)).shape == (2, 8, 8, 8) and isinstance(up.post, torch.nn.Upsample)
    perm = torch.randperm(16)
    matched = surgery.adapter((16, 8, 8), (16, 8, 8), init="matching", assignment=perm)
    assert torch.equal(matched(x), x[:, perm])
    tokens = surgery.adapter((197, 768), (197, 384))
    assert isinstance(tokens.map, torch.nn.Linear) and tokens(torch.randn(2, 197, 768)).shape == (2, 197, 384)
    with pytest.raises(surgery.SurgeryError, match="no adapter maps"):
        surgery.adapter((197, 768), (50, 768))
    assert isinstance(surgery.adapter((8, 4, 4), (16, 4, 4)).map, torch.nn.Conv2d)
    assert isinstance(surgery.adapter((8,), (16,)).map, torch.nn.Linear)


def test_stitch_mismatch_without_adapters() -> None:
    x = torch.randn(1, 3, 32, 32)
    a = surgery.cut(surgery.build_model("resnet18").eval(), "layer2", x)
    b = surgery.cut(surgery.build_model("resnet50").eval(), "layer2", x)
    with pytest.raises(surgery.SurgeryError, match="128x4x4.*512x4x4.*allow an adapter"):
        surgery.stitch(a[0], b[1], x, allow_adapter=False)


def test_least_squares_stitch_between_a_vit_and_its_wider_copy() -> None:
    timm = pytest.importorskip("timm")
    import growth

    torch.manual_seed(0)
    small = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=2, embed_dim=32, num_classes=10
    ).eval()
    x = torch.randn(8, 3, 32, 32)
    wide = growth.net2wider(small, "patch_embed.proj", factor=2, seed=0, noise=0.1, example_input=x).eval()
    a, b = surgery.cut(small, "blocks.0", x), surgery.cut(wide, "blocks.0", x)
    fitted = surgery.stitch(a[0], b[1], x, init="lstsq", reference=b[0]).eval()
    ad = fitted[1]
    assert (ad.map.in_features, ad.map.out_features) == (32, 64)

    def tokens(piece: torch.nn.Module) -> torch.Tensor:
        out = piece(x)
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(-1, out.shape[-1])

    with torch.no_grad():
        rows, cols = tokens(a[0]), tokens(b[0])
        solution = torch.linalg.lstsq(torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1), cols).solution
        torch.testing.assert_close(ad.map.weight, solution[:32].T, atol=1e-5, rtol=0)
        torch.testing.assert_close(ad.map.bias, solution[32], atol=1e-5, rtol=0)
        unseen = torch.randn(16, 3, 32, 32)
        target = wide(unseen)
        random = surgery.stitch(a[0], b[1], x, init="random").eval()
        fitted_error = (fitted(unseen) - target).abs().mean()
        random_error = (random(unseen) - target).abs().mean()
    # the wider copy's tokens are a linear function of the small one's: least squares recovers it
    assert fitted_error < 1e-4 < random_error


def test_stitch_and_suggest_splits_refuse_a_missing_example_input() -> None:
    x = torch.randn(2, 3, 32, 32)
    net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10).eval()
    pieces = surgery.cut(net, "features.0", x)
    with pytest.raises(surgery.SurgeryError, match=r"^stitch needs example_input="):
        surgery.stitch(pieces[0], pieces[1], None)
    with pytest.raises(surgery.SurgeryError, match=r"^suggest_splits needs example_input="):
        suggest_splits(net, None, 1e9, 1e10, 1e6)
