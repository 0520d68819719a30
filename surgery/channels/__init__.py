"""Which channels of a traced network are coupled, so they can be permuted or replicated together.

A *channel space* is one dimension of one fx node's output (dim 1 of a conv's
NCHW output, the last dim of a Linear's output). Spaces are coupled when changing
the channels of one forces the same change on the other: a residual addition, an
SE ``x * scale``, a BatchNorm or depthwise conv passing the channels through, a
concatenation placing them at an offset of a wider tensor, a flatten turning each
channel into H*W features of a Linear's input. :func:`analyze_channels` walks the
graph once and returns every coupled :class:`ChannelGroup`: the layers whose
outputs write the channels (*producers*), the per-channel parameters that follow
them (*followers*: BatchNorm, depthwise convs, ConvNeXt's layer scale) and the
layers that read them (*consumers*), plus the reasons a change would not be exact.

>>> import torchvision
>>> from surgery.channels import analyze_channels
>>> a = analyze_channels(torchvision.models.resnet18())
>>> g = a.group_at("layer2.0.conv2")
>>> [p.target for p in g.producers]
['layer2.0.conv2', 'layer2.0.downsample.0', 'layer2.1.conv2']
>>> [c.target for c in g.consumers]
['layer2.1.conv1', 'layer3.0.conv1', 'layer3.0.downsample.0']
>>> a.group_at("fc").obstacle(replicate=True)
"reaches the model output (node 'output')"

The analysis only reads the graph and the shapes of a meta-device run (no
arithmetic): the weight edits that use it live in :mod:`surgery.channels.remap` and
:mod:`growth`.

The package holds shape inference (:mod:`~surgery.channels.shapes`), the result types
(:mod:`~surgery.channels.groups`), the union-find walk (:mod:`~surgery.channels.walk`)
that looks each op's rule up in :mod:`~surgery.channels.registry`, and the rules, one
module per family of ops (:mod:`surgery.channels.rules`). A new layer type registers its
rule with :func:`register_rule` and its weight edit with :func:`register_edit`, in one module.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from surgery.channels import rules  # noqa: F401 - importing the rule families registers them for the walk
from surgery.channels.groups import (
    ChannelAnalysis,
    ChannelGroup,
    Endpoint,
    Layout,
    Segment,
)
from surgery.channels.registry import ModuleRule, NodeRule, register_edit, register_rule
from surgery.channels.shapes import Shapes, describe_node, infer_shapes
from surgery.channels.walk import _Walk
from surgery.graph.capture import trace

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "Endpoint",
    "Layout",
    "ModuleRule",
    "NodeRule",
    "Segment",
    "Shapes",
    "analyze_channels",
    "describe_node",
    "infer_shapes",
    "register_edit",
    "register_rule",
]


def analyze_channels(model: nn.Module, example_input: Any = None) -> ChannelAnalysis:
    """Analyse which channels of ``model`` are coupled (traces it unless it is a GraphModule).

    Args:
        model: any fx-traceable module or a GraphModule.
        example_input: an input tensor (or a tuple of them) that fixes the shapes; by
            default the first of a few image sizes that runs.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    shapes = infer_shapes(gm, example_input)
    walk = _Walk(gm, shapes)
    walk.run()
    groups = walk.finish()
    layouts = {n.name: walk.rooted(layout) for n, layout in walk.layouts.items()}
    return ChannelAnalysis(gm.graph, shapes, layouts, groups)
