"""What the growth ops promise beyond exactness: coupled groups, structure, refusals, cutting, saving."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import growth
import surgery
from growth.check import vary_constant_weights
from growth.errors import GrowthError
from surgery.errors import SurgeryError


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return vary_constant_weights(surgery.build_model("resnet18").eval(), torch.Generator().manual_seed(0))


def _same_output(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        y = a.eval()(x)
        return bool((b.eval()(x) - y).abs().max() <= 1e-4 * y.abs().max())


X = torch.randn(2, 3, 64, 64)


def test_widening_a_residual_writer_widens_the_whole_stream(resnet18: nn.Module) -> None:
    wide = growth.net2wider(resnet18, "layer2.0.conv2", factor=1.5, seed=0)
    for writer in ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"):
        assert wide.get_submodule(writer).out_channels == 192
    for norm in ("layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2"):
        assert wide.get_submodule(norm).num_features == 192
    for reader in ("layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"):
        assert wide.get_submodule(reader).in_channels == 192
    assert wide.get_submodule("layer2.0.conv1").out_channels == 128  # not coupled
    extra = 64  # new channels
    expected = extra * (128 * 9 + 64 + 128 * 9)  # rows of the three writers
    expected += 3 * 2 * extra  # their BatchNorms
    expected += extra * (128 * 9 + 256 * 9 + 256)  # columns of the three readers
    assert surgery.count_params(wide) - surgery.count_params(resnet18) == expected
    assert _same_output(resnet18, wide, X)


def test_widening_mobilenet_project_conv_widens_the_residual_partner() -> None:
    net = surgery.build_model("mobilenet_v2").eval()
    wide = growth.net2wider(net, "features.3.conv.2", new_width=36, seed=0)
    assert wide.get_submodule("features.2.conv.2").out_channels == 36
    assert wide.get_submodule("features.4.conv.0.0").in_channels == 36
    assert _same_output(net, wide, X)


def test_replicated_units_copy_weights_and_statistics(resnet18: nn.Module) -> None:
    wide = growth.net2wider(resnet18, "layer1.0.conv1", factor=1.5, seed=3)
    conv, bn, reader = (wide.get_submodule(p) for p in ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"))
    old_conv, old_bn, old_reader = (
        resnet18.get_submodule(p) for p in ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2")
    )
    assert torch.equal(conv.weight[:64], old_conv.weight)
    copies = [next(c for c in range(64) if torch.equal(conv.weight[j], old_conv.weight[c])) for j in range(64, 96)]
    for j, c in zip(range(64, 96), copies):
        assert torch.equal(bn.running_mean[j], old_bn.running_mean[c]) and torch.equal(
            bn.running_var[j], old_bn.running_var[c]
        )
    counts = torch.bincount(torch.tensor(copies), minlength=64) + 1
    for j, c in zip(range(64, 96), copies):
        assert torch.allclose(reader.weight[:, j], old_reader.weight[:, c] / counts[c])


def test_several_sites_widen_each_group_once(resnet18: nn.Module) -> None:
    wide = growth.net2wider(resnet18, ["layer2.0.conv2", "layer2.1.conv2", "layer1.0.conv1"], factor=1.5, seed=0)
    assert wide.get_submodule("layer2.1.conv2").out_channels == 192  # one group: widened once, not 288
    assert wide.get_submodule("layer1.0.conv1").out_channels == 96
    assert _same_output(resnet18, wide, X)


def test_widen_every_conv_of_resnet50() -> None:
    net = surgery.build_model("resnet50").eval()
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    wide = growth.net2wider(net, convs, factor=1.5, seed=0)
    for name in convs:
        assert wide.get_submodule(name).out_channels == math.ceil(net.get_submodule(name).out_channels * 1.5)
    assert _same_output(net, wide, X)


def test_grouped_convs_keep_new_channels_in_their_group() -> None:
    net = surgery.build_model("resnext50_32x4d").eval()
    with pytest.raises(GrowthError, match="not a multiple of 32"):
        growth.net2wider(net, "layer1.0.conv1", new_width=130)
    wide = growth.net2wider(net, "layer1.0.conv1", factor=1.5, seed=0)
    assert wide.get_submodule("layer1.0.conv2").in_channels == 192
    assert _same_output(net, wide, X)


def test_noise_breaks_symmetry_and_keeps_the_function(resnet18: nn.Module) -> None:
    exact = growth.net2wider(resnet18, "layer1.0.conv1", factor=2.0, seed=0)
    noisy = growth.net2wider(resnet18, "layer1.0.conv1", factor=2.0, seed=0, noise=0.5)
    assert not torch.equal(exact.get_submodule("layer1.0.conv2").weight, noisy.get_submodule("layer1.0.conv2").weight)
    assert _same_output(resnet18, noisy, X)


def test_identity_layers_start_as_identity(resnet18: nn.Module) -> None:
    deep = growth.net2deeper(resnet18, "layer1", groups=4, kernel_size=3)
    conv, bn, _ = deep.get_submodule("layer1.net2deeper0")
    weight = conv.weight.detach()
    assert weight.shape == (64, 16, 3, 3) and int(weight.sum()) == 64
    assert torch.equal(weight[:, :, 1, 1][torch.arange(64), torch.arange(64) % 16], torch.ones(64))
    # the BatchNorm holds the statistics of the value it follows and undoes them
    value = surgery.cut(resnet18.eval(), "layer1")[0](growth.graphedit.default_inputs(resnet18).args[0])
    assert torch.allclose(bn.running_mean, value.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.weight, torch.sqrt(value.var((0, 2, 3), unbiased=False) + bn.eps), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(bn.eval()(value), value, atol=1e-5)
        trained = bn.train()(value)  # batch statistics of the same value: still the identity
        assert torch.allclose(trained, value, atol=1e-4)


def test_refusals_say_why_and_where(resnet18: nn.Module) -> None:
    with pytest.raises(
        GrowthError, match=r"'layer1.0.bn2' \(BatchNorm2d\) can output negative values.*applicable sites: relu, maxpool"
    ):
        growth.net2deeper(resnet18, "layer1.0.bn2")
    assert _same_output(resnet18, growth.net2deeper(resnet18, "layer1.0.bn2", activation=None), X)
    with pytest.raises(GrowthError, match=r"a conv needs \(N, C, H, W\), use kind='linear'"):
        growth.net2deeper(resnet18, "flatten")
    with pytest.raises(GrowthError, match="reaches the model output"):
        growth.net2wider(resnet18, "fc", factor=1.5)
    with pytest.raises(GrowthError, match="coupled to conv1, layer1.0.conv2 \\(a residual addition"):
        growth.net2branch(resnet18, "layer1.1.conv2", merge="concat")
    with pytest.raises(GrowthError, match="not a Conv2d or Linear"):
        growth.net2branch(resnet18, "layer1.0.bn1")
    with pytest.raises(GrowthError, match="3x3 kernel can only grow by an even amount"):
        growth.widen_kernel(resnet18, "layer1.0.conv1", kernel_size=4)
    with pytest.raises(GrowthError, match="which 3x3 does not enlarge"):
        growth.widen_kernel(resnet18, "layer1.0.conv1", kernel_size=3)
    with pytest.raises(GrowthError, match="does not come before"):
        growth.add_skip(resnet18, "layer2", "layer1")
    upsampling = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, padding=1), nn.Upsample(scale_factor=2))
    with pytest.raises(GrowthError, match="the source is 31x31, not an integer multiple of the destination's 62x62"):
        growth.add_skip(upsampling, "0", "2")
    with pytest.raises(GrowthError, match="overwritten in place later"):
        growth.add_skip(resnet18, "bn1", "layer1")
    with pytest.raises(GrowthError, match="two .N, C, H, W. or two .N, F. values"):
        growth.add_skip(resnet18, "layer4", "fc")


def test_branch_padding_suggests_a_kernel() -> None:
    net = surgery.build_model("convnext_tiny").eval()
    with pytest.raises(GrowthError, match="try kernel_size=2"):
        growth.net2branch(net, "features.2.1")


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
def test_bad_input_is_one_line(resnet18: nn.Module) -> None:
    with pytest.raises(SurgeryError, match="closest: layer2.0.conv2, layer2.0.conv1"):
        growth.net2wider(resnet18, "layer2.0.conv", factor=1.5)
    for bad in ({"factor": 1.0}, {"factor": 0.5}, {"new_width": 64}, {}, {"factor": 2.0, "new_width": 128}):
        with pytest.raises(GrowthError) as e:
            growth.net2wider(resnet18, "layer1.0.conv1", **bad)
        assert "\n" not in str(e.value)
    with pytest.raises(GrowthError, match="unknown growth op 'net2wide'.*closest: net2wider"):
        growth.sites(resnet18, "net2wide")
    with pytest.raises(SurgeryError, match="cannot trace"):
        growth.net2wider(nn.Transformer(d_model=8, nhead=2), "x", factor=1.5)


def test_grown_models_are_normal_modules_that_cut_at_module_paths(resnet18: nn.Module) -> None:
    grown = growth.net2deeper(resnet18, "layer2_0_relu")
    grown = growth.net2branch(grown, "layer2.0.conv2", seed=0)
    grown = growth.add_skip(grown, "layer1", "layer2")
    assert isinstance(grown, torch.fx.GraphModule) and isinstance(grown.layer2, nn.Sequential)
    x = torch.randn(2, 3, 64, 64)
    for at in ["layer2", "layer2.0.net2deeper0", "layer2.0.net2branch0", ["layer1", "layer2.0"]]:
        pieces = surgery.cut(grown.eval(), at)
        with torch.no_grad():
            assert torch.equal(pieces(x), grown(x)), at
    index = surgery.names.GraphIndex(grown.graph)
    assert index.node("layer2.0.net2deeper0").target == "layer2.0.net2deeper0.2"
    end = index.node("layer2")  # the skip joins at the end of layer2
    assert end.args[1].target == "layer2.skip0.0"


def test_every_op_saves_and_loads_exactly(resnet18: nn.Module, tmp_path) -> None:
    grown = growth.net2wider(resnet18, "layer1.0.conv1", factor=1.5, seed=0, noise=0.1)
    grown = growth.net2deeper(grown, "layer3", kind="conv", kernel_size=1)
    grown = growth.net2branch(grown, "layer3.0.conv1", merge="concat", seed=1)
    grown = growth.widen_kernel(grown, "layer2.1.conv1", kernel_size=5)
    grown = growth.add_skip(grown, "layer2", "layer3.1")
    grown = growth.net2deeper(grown, "flatten", kind="linear")
    grown = surgery.permute_channels(grown, "layer4", torch.randperm(512).tolist())
    ops = [t.op for t in surgery.recipe_of(grown).transforms]
    assert ops == [
        "net2wider",
        "net2deeper",
        "net2branch",
        "widen_kernel",
        "add_skip",
        "net2deeper",
        "permute_channels",
    ]
    surgery.save(grown, tmp_path / "grown")
    again = surgery.load(tmp_path / "grown")
    assert again.state_dict().keys() == grown.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), grown.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(again.eval()(X), grown.eval()(X))
    assert _same_output(resnet18, again, X)


def test_linear_networks_grow_too() -> None:
    mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    x = torch.randn(4, 12)
    assert growth.sites(mlp, "net2wider") == ["0", "2"]
    grown = growth.net2wider(mlp, "0", new_width=48, seed=0, check=True)
    grown = growth.net2deeper(grown, "3", kind="linear", check=True)
    grown = growth.net2branch(grown, "4", seed=0, check=True)
    grown = growth.add_skip(grown, "1", "4", check=True)
    assert _same_output(mlp, grown, x)
    assert growth.sites(grown, "add_skip")[:2] == ["0->1", "0->2"]
