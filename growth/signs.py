"""Which values of a graph are never negative (so a ReLU after an identity layer keeps them as they are).

>>> import torchvision
>>> from surgery.graph.capture import trace
>>> from growth.signs import negative_reasons
>>> gm = trace(torchvision.models.resnet18())
>>> reasons = {n.name: r for n, r in negative_reasons(gm).items()}
>>> reasons["layer1_0_relu"] is None
True
>>> reasons["add"]
"'layer1.0.bn2' (BatchNorm2d) can output negative values"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import fx, nn
from torchvision.ops import StochasticDepth

from surgery.channels import describe_node
from surgery.graph.ops import is_call, targets

FX = ("function", "method")  # the forms torch.fx records (graphs torch.export captured are not read here)

# Values whose every element is >= 0 whatever the input.
_SOURCE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_SOURCES = targets("relu", "relu_", "relu6", "sigmoid", "hardsigmoid", "softmax", kinds=FX)

# Non-negative when their (first) input is: pooling, dropout, reshaping, selecting.
_KEEPING_MODULES = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
    StochasticDepth,
)
_KEEPING = targets(
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "dropout",
    "stochastic_depth",
    "getitem",
    "mean",
    *("flatten", "view", "reshape", "permute", "transpose"),
    kinds=FX,
) | targets("contiguous", "clone", kinds=("method",))

# Non-negative when every tensor operand is (scalars must be >= 0 too).
_JOINING = targets("add", "add_", "mul", "mul_", "cat", kinds=FX)


def _rule(gm: fx.GraphModule, node: fx.Node) -> str:
    """``"source"``, ``"keep"`` (follows the first input), ``"join"`` (follows all inputs) or ``"unknown"``."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _SOURCE_MODULES):
            return "source"
        if isinstance(module, _KEEPING_MODULES):
            return "keep"
        if isinstance(module, nn.Upsample) and module.mode in ("nearest", "bilinear"):
            return "keep"
        return "unknown"
    for kind, table in (("source", _SOURCES), ("keep", _KEEPING), ("join", _JOINING)):
        if is_call(node, table):
            return kind
    return "unknown"


def _operands(node: fx.Node) -> list[object]:
    if node.target in (torch.cat, torch.concat):
        return list(cast(Sequence[object], node.args[0]))  # cat's first argument: its list of tensors
    return list(node.args[:2])


def negative_reasons(gm: fx.GraphModule) -> dict[fx.Node, str | None]:
    """For every node: None if its output is >= 0 everywhere, else the node that can make it negative."""
    reasons: dict[fx.Node, str | None] = {}

    def sign(arg: object) -> str | None:
        if isinstance(arg, fx.Node):
            return reasons[arg]
        if isinstance(arg, (int, float)) and arg < 0:
            return f"a negative constant {arg} enters"
        return None

    for node in gm.graph.nodes:
        rule = _rule(gm, node)
        if rule == "source":
            reasons[node] = None
        elif rule == "keep" and isinstance(node.args[0], fx.Node):
            reasons[node] = reasons[node.args[0]]
        elif rule == "join":
            reasons[node] = next((r for a in _operands(node) if (r := sign(a)) is not None), None)
        else:
            reasons[node] = f"{describe_node(gm, node)} can output negative values"
    return reasons
