"""surgery.pieces.cut: cutting real torchvision models, the pieces compose to the model bit for bit.

Bad cut points (unknown names, out of graph order, repeated, leaving a piece empty) are refused in one line.
"""

from __future__ import annotations

import random

import pytest
import torch
import torchvision

import surgery
from surgery.pieces.cut import piece_info

# model -> (constructor kwargs, input size, hand-picked cuts: stage ends and mid-block points)
MODELS = {
    "resnet18": ({}, 64, ["layer1.0.conv2", "layer2", "layer3.1.bn1"]),
    "resnet50": ({}, 64, ["layer1", "layer2_0_relu_1", "layer3.2.conv2"]),
    "mobilenet_v3_small": ({}, 64, ["features.2.block.1", "features.4.block.2", "features.9"]),
    "densenet121": (
        {},
        64,
        ["features.denseblock1.denselayer2.conv1", "features.transition2", "features.denseblock3.denselayer5"],
    ),
    "efficientnet_b0": ({}, 64, ["features.2.0.block.1", "features.4.1.block.2", "features.6"]),
    "convnext_tiny": ({}, 64, ["features.1.0.block.3", "features.3", "features.5.2.block.4"]),
    "vit_b_16": (
        {"image_size": 64},
        64,
        ["conv_proj", "encoder.layers.encoder_layer_2.self_attention", "encoder.layers.encoder_layer_7"],
    ),
    "swin_t": ({}, 64, ["features.1.0.attn", "features.3", "features.5.3.mlp.1"]),
    "googlenet": (
        {"aux_logits": False, "init_weights": False},
        64,
        ["inception3a.branch2", "inception4b", "inception5a.branch4.0"],
    ),
    "inception_v3": (
        {"aux_logits": False, "init_weights": False},
        96,
        ["Mixed_5b.branch5x5_1", "Mixed_6a", "Mixed_6c.branch7x7dbl_3"],
    ),
}


def _model(name: str) -> torch.nn.Module:
    kwargs, _, _ = MODELS[name]
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _sampled_cuts(model: torch.nn.Module, k: int, seed: int) -> list[str]:
    """k node names spread over the graph (graph order), to probe arbitrary cut points."""
    names = [p.name for p in surgery.cut_points(model, include_nodes=True) if p.kind == "node"]
    return sorted(random.Random(seed).sample(names, k), key=names.index)


@pytest.mark.parametrize("name", list(MODELS))
def test_cut_is_exact_and_partitions_parameters(name: str) -> None:
    model = _model(name)
    _, size, cuts = MODELS[name]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)
        for at in [cuts, _sampled_cuts(model, 3, seed=len(name))]:
            pieces = surgery.cut(model, at)
            assert len(pieces) == len(at) + 1
            assert torch.equal(pieces(x), reference), f"{name} cut at {at} is not exact"
            # each piece owns only what it uses; together exactly the parameters the graph uses
            used = {id(p) for piece in pieces for p in piece.parameters()}
            per_piece = sum(surgery.count_params(p) for p in pieces)
            assert per_piece == sum(p.numel() for p in model.parameters() if id(p) in used)
    if name not in ("googlenet", "inception_v3"):  # their auxiliary heads are never called in eval
        assert per_piece == surgery.count_params(model)


def test_mid_block_cut_carries_every_live_value() -> None:
    model = _model("resnet18")
    x = torch.randn(2, 3, 64, 64)
    pieces = surgery.cut(model, ["layer2.0.conv2"], x)
    info = piece_info(pieces[0])
    # the branch output leads, then the block input that the downsample path still needs
    assert info.out_names == ("layer2_0_conv2", "layer1_1_relu_1")
    assert [s.shape for s in info.out_specs] == [(128, 8, 8), (64, 16, 16)]
    out = pieces[0](x)
    assert isinstance(out, tuple) and len(out) == 2
    assert torch.equal(pieces[1](*out), model(x))


def test_pieces_slice_and_iteration() -> None:
    model = _model("resnet18")
    x = torch.randn(1, 3, 64, 64)
    pieces = surgery.cut(model, ["layer1", "layer2", "layer3"])
    head = pieces[0:2]
    assert isinstance(head, surgery.Pieces) and len(head) == 2 and head.cuts == ["layer1"]
    assert torch.equal(pieces[2:4](head(x)), model(x))
    assert [type(p).__name__ for p in pieces] == ["Piece"] * 4


def test_pieces_train_on_their_own() -> None:
    model = surgery.build_model("resnet18", num_classes=10)
    pieces = surgery.cut(model, "layer2").train()
    opt = torch.optim.SGD(pieces[1].parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in pieces[0].parameters()]
    loss = torch.nn.functional.cross_entropy(pieces(x), y)
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, pieces[0].parameters()))
    assert all(p.grad is not None for p in pieces[1].parameters())


def test_cut_points_lists_modules_and_nodes_with_stats() -> None:
    model = _model("resnet18")
    points = surgery.cut_points(model, torch.randn(1, 3, 64, 64))
    by_name = {p.name: p for p in points}
    assert by_name["layer2"].shape == "128x8x8" and by_name["layer2"].crossing == 1
    assert by_name["layer2.0.conv2"].crossing == 2  # inside the residual block
    assert by_name["layer1_0_relu_1"].kind == "node"
    positions = [p.position for p in points]
    assert positions == sorted(positions)
    assert by_name["layer4"].params == sum(
        surgery.count_params(getattr(model, m)) for m in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    )
    flops = [p.flops for p in points]
    assert flops == sorted(flops) and flops[-1] < surgery.count_flops(model, torch.randn(1, 3, 64, 64))


def test_trace_keeps_module_paths_and_shares_parameters() -> None:
    model = _model("resnet18")
    gm = surgery.trace(model)
    assert gm.get_submodule("layer2.0.conv1") is model.layer2[0].conv1
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(gm(x), model(x))


def test_replace_gives_cifar_stem_and_records_it() -> None:
    model = surgery.build_model("resnet18", num_classes=10)
    new = surgery.replace(model, "conv1", torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False))
    new = surgery.replace(new, "maxpool", torch.nn.Identity())
    assert model.conv1.kernel_size == (7, 7)  # the input model is untouched
    assert new(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert [t.op for t in surgery.recipe_of(new).transforms] == ["replace", "replace"]
    rebuilt = surgery.models.build.rebuild(surgery.recipe_of(new))
    assert repr(rebuilt) == repr(new)


# --- bad cut points: one clear line each ----------------------------------------------------------


def test_unknown_cut_name_lists_closest(r18: torch.nn.Module) -> None:
    with pytest.raises(surgery.SurgeryError, match=r"'layer5'.*closest: layer\d"):
        surgery.cut(r18, "layer5")


def test_cut_order_and_repeats(r18: torch.nn.Module) -> None:
    with pytest.raises(surgery.SurgeryError, match="graph order"):
        surgery.cut(r18, ["layer3", "layer2"])
    with pytest.raises(surgery.SurgeryError, match="given twice"):
        surgery.cut(r18, ["layer2", "layer2"])
    with pytest.raises(surgery.SurgeryError, match="last piece empty"):
        surgery.cut(r18, ["fc"])


# --- boundaries: what crosses a cut -----------------------------------------------------------------


def _bert() -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertModel(config).eval()


def _handed_over(pieces: surgery.Pieces, *args: object, **kwargs: object) -> list[tuple]:
    """What each piece but the last returns, as a tuple of values, chaining the pieces on the given call."""
    out, values = pieces[0](*args, **kwargs), []
    for k in range(1, len(pieces)):
        values.append(out if isinstance(out, tuple) else (out,))
        out = pieces[k](*values[-1])
    return values


def test_constants_stay_inside_pieces_only_tensors_cross() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    pieces = surgery.cut(vit, ["blocks.0", "blocks.2"])  # timm's blocks once handed over (x, None, False)
    with torch.no_grad():
        assert torch.equal(pieces(x), vit(x))
        assert all(isinstance(v, torch.Tensor) for b in _handed_over(pieces, x) for v in b)
    bert = _bert()
    pieces = surgery.cut(bert, ["encoder.layer.0", "encoder.layer.1.attention"], torch.randint(1, 64, (2, 16)))
    assert all(len(i.in_names) == len(i.in_specs) for i in pieces.infos())
    for batch, length in [(2, 16), (3, 7)]:  # the batch size and length are read from the tensors that cross
        ids = torch.randint(1, 64, (batch, length))
        with torch.no_grad():
            assert torch.equal(pieces(ids).last_hidden_state, bert(ids).last_hidden_state)
            assert all(
                isinstance(v, torch.Tensor) and v.shape[0] == batch for b in _handed_over(pieces, ids) for v in b
            )


def test_boundary_specs_come_from_the_graph_without_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    bert = _bert()
    ids = torch.randint(1, 64, (2, 10))
    ran = surgery.cut(bert, "encoder.layer.0", ids).infer_specs(ids)
    monkeypatch.setattr(surgery.Pieces, "infer_specs", lambda *a: pytest.fail("cut ran the example through"))
    pieces = surgery.cut(bert, "encoder.layer.0", ids)
    assert [(i.in_specs, i.out_specs) for i in pieces.infos()] == [(i.in_specs, i.out_specs) for i in ran.infos()]
    assert [s.shape for s in pieces.infos()[0].out_specs] == [(10, 32), (1, 10, 10)]
    assert pieces.infos()[1].out_specs[0].kind == "BaseModelOutputWithPoolingAndCrossAttentions"


def _tuple_models() -> dict[str, tuple[torch.nn.Module, str, int]]:
    """Small timm models whose blocks return several tensors: (model, block, image size)."""
    from timm.models.crossvit import CrossVit
    from timm.models.pit import PoolingVisionTransformer
    from timm.models.tnt import TNT

    return {
        "crossvit": (  # blocks.0 returns [small, large]; captured by torch.export
            CrossVit(img_size=48, patch_size=(8, 16), embed_dim=(16, 32), depth=((1, 1, 0), (1, 1, 0)),
                     num_heads=(2, 2), mlp_ratio=(2, 2, 1), num_classes=10),
            "blocks.0",
            48,
        ),
        "tnt": (  # blocks.0 returns (pixel_embed, patch_embed); captured by fx
            TNT(img_size=32, patch_size=8, embed_dim=32, inner_dim=8, depth=2, num_heads_outer=2,
                num_heads_inner=2, num_classes=10),
            "blocks.0",
            32,
        ),
        "pit": (  # transformers.0 returns (x, cls_tokens)
            PoolingVisionTransformer(img_size=32, patch_size=8, stride=4, base_dims=[8, 8], depth=[1, 1],
                                     heads=[2, 2], mlp_ratio=2, num_classes=10),
            "transformers.0",
            32,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["crossvit", "tnt", "pit"])
def test_a_module_returning_several_values_hands_them_over_in_its_order(name: str) -> None:
    torch.manual_seed(0)
    model, at, size = _tuple_models()[name]
    model.eval()
    x = torch.randn(2, 3, size, size)
    returned: list = []
    hook = model.get_submodule(at).register_forward_hook(lambda m, args, out: returned.append(out))
    with torch.no_grad():
        want = model(x)
    hook.remove()
    pieces = surgery.cut(model, at, x)
    with torch.no_grad():
        got = pieces[0](x)
        assert isinstance(got, tuple) and len(got) >= len(returned[0]) >= 2
        assert all(torch.equal(g, r) for g, r in zip(got, returned[0]))  # the module's values first, in its order
        assert torch.equal(pieces(x), want) and pieces(torch.randn(3, 3, size, size)).shape == (3, 10)


def test_an_optional_input_fixed_at_its_default_stays_inside_and_other_values_are_refused() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    gm = torch.fx.symbolic_trace(vit)  # a graph of the user's own: attn_mask=None, is_causal=False are inputs
    pieces = surgery.cut(gm, "blocks.0")
    x = torch.randn(2, 3, 32, 32)
    assert piece_info(pieces[0]).out_names == ("add_2",)  # no longer (add_2, attn_mask, is_causal)
    with torch.no_grad():
        assert torch.equal(pieces(x), vit(x)) and torch.equal(pieces[1](pieces[0](x, None, False)), vit(x))
        with pytest.raises(surgery.SurgeryError, match=r"take 'attn_mask' only at its default \(None\)") as e:
            pieces[0](x, attn_mask=torch.zeros(2, 1, 17, 17, dtype=torch.bool))  # piece 1 could not see it
    assert "\n" not in str(e.value)
