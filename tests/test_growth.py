"""growth: each op on real torchvision models, and what the package promises across its ops.

Each op keeps the function (float32, float64) and grows the size as it should; refusals say why
and where, bad input is one line, grown models cut at module paths and save and load exactly, and
networks of Linears grow too.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from helpers import X, same_output
from torch import nn

import growth
import surgery
from growth.check import vary_constant_weights
from growth.errors import GrowthError
from surgery.channels import infer_shapes
from surgery.core.errors import SurgeryError
from surgery.graph.names import GraphIndex

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0", "convnext_tiny", "vgg11_bn"]
NONE = {"activation": None}


@dataclass(frozen=True)
class Case:
    model: str
    op: str
    site: str
    args: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.model}:{self.op}@{self.site}" + (f"[{extra}]" if extra else "")


CASES = [
    # net2wider: plain layers, residual streams, depthwise followers, SE products, concatenations, flatten into a Linear
    Case("resnet18", "net2wider", "layer1.0.conv1", {"factor": 1.5, "seed": 0}),
    Case("resnet18", "net2wider", "layer2.0.conv2", {"factor": 1.5, "seed": 1}),
    Case("resnet50", "net2wider", "layer1.0.conv2", {"new_width": 80, "seed": 0}),
    Case("resnet50", "net2wider", "layer3.0.downsample.0", {"factor": 1.25, "seed": 0, "noise": 0.1}),
    Case("mobilenet_v2", "net2wider", "features.2.conv.0.0", {"factor": 2.0, "seed": 0}),
    Case("mobilenet_v2", "net2wider", "features.3.conv.2", {"factor": 1.5, "seed": 0}),
    Case("densenet121", "net2wider", "features.denseblock2.denselayer3.conv2", {"factor": 1.5, "seed": 0}),
    Case("densenet121", "net2wider", "features.conv0", {"factor": 1.5, "seed": 0}),
    Case("efficientnet_b0", "net2wider", "features.2.0.block.0.0", {"factor": 1.5, "seed": 0}),
    Case("efficientnet_b0", "net2wider", "features.3.1.block.3.0", {"factor": 1.5, "seed": 0}),
    Case("convnext_tiny", "net2wider", "features.1.0.block.3", {"factor": 1.5, "seed": 0}),
    Case("convnext_tiny", "net2wider", "features.5.4.block.3", {"factor": 1.25, "seed": 0}),
    Case("vgg11_bn", "net2wider", "features.25", {"factor": 1.5, "seed": 0}),
    Case("vgg11_bn", "net2wider", "classifier.0", {"factor": 1.25, "seed": 0}),
    # net2deeper: after ReLUs and pools (with the ReLU), anywhere with activation=None, linear on (N, F) and
    # channels-last values
    Case("resnet18", "net2deeper", "layer1_0_relu"),
    Case("resnet18", "net2deeper", "layer2"),
    Case("resnet18", "net2deeper", "flatten", {"kind": "linear"}),
    Case("resnet50", "net2deeper", "maxpool", {"kernel_size": 1, "groups": 4}),
    Case("resnet50", "net2deeper", "layer3.1"),
    Case("mobilenet_v2", "net2deeper", "features.2.conv.0"),
    Case("mobilenet_v2", "net2deeper", "features.3", NONE),
    Case("densenet121", "net2deeper", "features.pool0"),
    Case("densenet121", "net2deeper", "features.denseblock1", {**NONE, "batchnorm": False}),
    Case("efficientnet_b0", "net2deeper", "features.3", NONE),
    Case("efficientnet_b0", "net2deeper", "features.2.0.block.1", {**NONE, "kernel_size": 5}),
    Case("convnext_tiny", "net2deeper", "features.1", NONE),
    Case("convnext_tiny", "net2deeper", "features.1.0.block.2", {**NONE, "kind": "linear", "batchnorm": False}),
    Case("vgg11_bn", "net2deeper", "features.2"),
    Case("vgg11_bn", "net2deeper", "classifier.1", {"kind": "linear"}),
    # net2branch: added beside convs of every stride/kernel and Linears, or concatenated into the readers
    Case("resnet18", "net2branch", "layer1.0.conv1", {"seed": 0}),
    Case("resnet18", "net2branch", "conv1", {"seed": 0, "kernel_size": 5}),
    Case("resnet18", "net2branch", "fc", {"seed": 0}),
    Case("resnet50", "net2branch", "layer2.0.conv2", {"seed": 0}),
    Case("mobilenet_v2", "net2branch", "features.2.conv.0.0", {"seed": 0, "merge": "concat", "width": 8}),
    Case("mobilenet_v2", "net2branch", "features.4.conv.1.0", {"seed": 0}),
    Case("densenet121", "net2branch", "features.denseblock1.denselayer2.conv2", {"seed": 0, "merge": "concat"}),
    Case("densenet121", "net2branch", "features.transition1.conv", {"seed": 0}),
    Case("efficientnet_b0", "net2branch", "features.2.0.block.1.0", {"seed": 0}),
    Case("efficientnet_b0", "net2branch", "features.1.0.block.1.fc1", {"seed": 0, "merge": "concat"}),
    Case("convnext_tiny", "net2branch", "features.1.0.block.3", {"seed": 0, "merge": "concat"}),
    Case("convnext_tiny", "net2branch", "features.2.1", {"seed": 0, "kernel_size": 2}),
    Case("vgg11_bn", "net2branch", "features.4", {"seed": 0, "merge": "concat"}),
    Case("vgg11_bn", "net2branch", "classifier.3", {"seed": 0}),
    # widen_kernel
    Case("resnet18", "widen_kernel", "layer1.0.conv1"),
    Case("resnet18", "widen_kernel", "conv1", {"kernel_size": 9}),
    Case("mobilenet_v2", "widen_kernel", "features.2.conv.1.0", {"kernel_size": 7}),
    Case("densenet121", "widen_kernel", "features.denseblock1.denselayer1.conv1", {"kernel_size": 3}),
    Case("efficientnet_b0", "widen_kernel", "features.3.0.block.1.0", {"kernel_size": 7}),
    Case("convnext_tiny", "widen_kernel", "features.1.0.block.0", {"kernel_size": 9}),
    Case("vgg11_bn", "widen_kernel", "features.0", {"kernel_size": (5, 3)}),
    Case("resnet50", "widen_kernel", "layer1.0.conv2"),
    # add_skip: same size, strided, into a Linear
    Case("resnet18", "add_skip", "layer1->layer2.0"),
    Case("resnet18", "add_skip", "layer3->avgpool"),
    Case("resnet18", "add_skip", "flatten->fc"),
    Case("resnet50", "add_skip", "maxpool->layer3.2"),
    Case("mobilenet_v2", "add_skip", "features.1->features.3"),
    Case("densenet121", "add_skip", "features.pool0->features.transition1"),
    Case("efficientnet_b0", "add_skip", "features.2->features.4.1"),
    Case("convnext_tiny", "add_skip", "features.1->features.3"),
    Case("vgg11_bn", "add_skip", "features.2->features.6"),
]


CASES.sort(key=lambda c: MODELS.index(c.model))


@functools.lru_cache(maxsize=2)  # a model in float32 and float64: CASES are sorted by model, so no model is built twice
def _model(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = surgery.build_model(name).eval()
    if name.startswith("vgg"):  # its head pooled to 2x2, not 7x7: the flatten still spreads each channel over
        net.avgpool = nn.AdaptiveAvgPool2d((2, 2))  # several features, and a test worker stays under 4 GB
        net.classifier[0] = nn.Linear(512 * 2 * 2, 4096)  # (25088 x 4096 weights held in float32 and float64)
    net = vary_constant_weights(net, torch.Generator().manual_seed(0))
    return net.to(dtype)


def _apply(case: Case, model: nn.Module, **extra: Any) -> nn.Module:
    return growth.OPS[case.op].apply(model, case.site, case.args, **extra).eval()


def _max_change(before: nn.Module, after: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        y = before(x)
        return float((after(x) - y).abs().max()), float(y.abs().max())


def _channels(model: nn.Module, name: str, x: torch.Tensor) -> tuple[int, ...]:
    """Per-sample shape of the value a module path or node name outputs."""
    gm = surgery.trace(model)
    return infer_shapes(gm, x).of[GraphIndex(gm.graph).node(name).name][1:]


def _expected_growth(case: Case, model: nn.Module, x: torch.Tensor) -> int | None:
    """The parameter count an op adds, from the model's own layers and shapes (None: checked elsewhere)."""
    a = case.args
    if case.op == "net2deeper":
        shape = _channels(model, case.site, x)
        c = shape[0] if a.get("kind", "conv") == "conv" else shape[-1]
        k = a.get("kernel_size", 3) if a.get("kind", "conv") == "conv" else 1
        bn = a.get("batchnorm", True)
        return c * c // a.get("groups", 1) * k * k + (2 * c if bn else c)
    if case.op == "net2branch" and a.get("merge", "add") == "add":
        layer = model.get_submodule(case.site)
        cin, cout = (
            (layer.in_channels, layer.out_channels)
            if isinstance(layer, nn.Conv2d)
            else (layer.in_features, layer.out_features)
        )
        k = a.get("kernel_size", 3) if isinstance(layer, nn.Conv2d) else 1
        hidden = max(1, cin // 2)
        return cin * hidden + hidden + hidden * cout * k * k + cout
    if case.op == "widen_kernel":
        conv = model.get_submodule(case.site)
        size = a.get("kernel_size", 5)
        kh, kw = (size, size) if isinstance(size, int) else size
        return conv.weight[:, :, 0, 0].numel() * (kh * kw - conv.kernel_size[0] * conv.kernel_size[1])
    if case.op == "add_skip":
        src, dst = case.site.split("->")
        return _channels(model, src, x)[0] * _channels(model, dst, x)[0] + _channels(model, dst, x)[0]
    return None


@pytest.mark.parametrize("case", CASES, ids=str)
def test_op_keeps_the_function(case: Case) -> None:
    x = torch.randn(2, 3, 64, 64)
    net = _model(case.model, torch.float32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grown = _apply(case, net, check=True)
    change, scale = _max_change(net, grown, x)
    assert change <= 1e-4 * scale, f"float32 output moved by {change} (max |y| {scale})"
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), "the input model was modified"
    added = surgery.count_params(grown) - surgery.count_params(net)
    expected = _expected_growth(case, net, x)
    assert added == expected if expected is not None else added > 0
    del before, grown, net  # the float32 half's models (a grown GraphModule is a reference cycle)
    gc.collect()

    net64 = _model(case.model, torch.float64)
    grown64 = _apply(case, net64)
    change, scale = _max_change(net64, grown64, x.double())
    assert change <= 1e-10 * scale, f"float64 output moved by {change} (max |y| {scale})"


def test_all_seven_models_get_every_op() -> None:
    covered = {(c.model, c.op) for c in CASES}
    assert covered == {(m, op) for m in MODELS for op in growth.OPS}


# --- the package as a whole: refusals, one-line errors, cutting and saving grown models -------------


def test_refusals_say_why_and_where(resnet18: nn.Module) -> None:
    with pytest.raises(
        GrowthError, match=r"'layer1.0.bn2' \(BatchNorm2d\) can output negative values.*applicable sites: relu, maxpool"
    ):
        growth.net2deeper(resnet18, "layer1.0.bn2")
    assert same_output(resnet18, growth.net2deeper(resnet18, "layer1.0.bn2", activation=None), X)
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
    index = surgery.graph.names.GraphIndex(grown.graph)
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
    assert same_output(resnet18, again, X)


def test_linear_networks_grow_too() -> None:
    mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    x = torch.randn(4, 12)
    assert growth.sites(mlp, "net2wider") == ["0", "2"]
    grown = growth.net2wider(mlp, "0", new_width=48, seed=0, check=True)
    grown = growth.net2deeper(grown, "3", kind="linear", check=True)
    grown = growth.net2branch(grown, "4", seed=0, check=True)
    grown = growth.add_skip(grown, "1", "4", check=True)
    assert same_output(mlp, grown, x)
    assert growth.sites(grown, "add_skip")[:2] == ["0->1", "0->2"]
