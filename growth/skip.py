"""add_skip: a new connection from an earlier value ``src`` into a later value ``dst``, starting at zero.

``dst`` becomes ``dst + conv1x1(src)`` (``Linear`` for (N, F) values) with the new
layer's weights and bias at zero; the 1x1 conv strides when ``src`` is spatially
larger than ``dst`` by an integer factor.

>>> import torch, torchvision, growth
>>> net = torchvision.models.resnet18().eval()
>>> skipped = growth.add_skip(net, "layer1", "layer2.0").eval()
>>> skipped.layer2[0].skip0
Sequential(
  (0): Conv2d(64, 128, kernel_size=(1, 1), stride=(2, 2))
)
>>> x = torch.randn(1, 3, 64, 64)
>>> torch.equal(skipped(x), net(x))
True
"""

from __future__ import annotations

import operator
import random
from typing import Any

import torch
from torch import fx, nn

from growth.graphedit import Workbench
from growth.registry import SITE_JOIN, GrowthOp, Proposal, not_applicable, register_op


def add_skip(model: nn.Module, src: str, dst: str, *, example_input: Any = None, check: bool = False) -> fx.GraphModule:
    """Add a zero-initialised 1x1 conv (or Linear) from ``src``'s output to ``dst``'s output.

    Args:
        model: any fx-traceable module; it is not modified.
        src: module path or fx node name of the earlier value (N, C, H, W) or (N, F).
        dst: module path or fx node name of the later value of the same rank; ``src``'s
            spatial size must be an integer multiple of ``dst``'s.
        example_input, check: see :func:`growth.net2wider`.

    >>> import torch, torchvision, growth
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> skipped = growth.add_skip(net, "layer2", "layer3_0_relu_1", check=True).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.equal(skipped(x), net(x))  # the new 1x1 conv starts at zero
    True
    """
    work = Workbench(model, example_input)
    source, target = work.node(src), work.node(dst)
    reason = skip_obstacle(work, source, target, overwritten_in_place(work.gm))
    if reason is not None:
        raise not_applicable("add_skip", f"{src}{SITE_JOIN}{dst}", reason, skip_sites(work))
    layer = _skip_layer(work.known_shape(source), work.known_shape(target), work.shapes.dtype)
    _, new_nodes = work.insert_chain(target, dst, "skip", [layer], source=source)
    merged = work.insert_function(new_nodes[-1], operator.add, (target, new_nodes[-1]), like=target)
    work.reroute(target, merged, keep=[merged])
    return work.finish("add_skip", check, src=src, dst=dst)


def overwritten_in_place(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Values that a later in-place op overwrites (reading them after it would see other numbers)."""
    found: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node.op == "call_module":
            in_place = bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
        elif node.op == "call_method":
            in_place = str(node.target).endswith("_")
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            in_place = (
                bool(node.kwargs.get("inplace")) or name.endswith("_") or node.target in (operator.iadd, operator.imul)
            )
        else:
            in_place = False
        if in_place:
            found.setdefault(node.args[0], node.name)
    return found


def _factor(src: tuple[int, ...], dst: tuple[int, ...]) -> int | None:
    """The integer stride taking src's H, W to dst's, or None."""
    h, w = src[2] // dst[2], src[3] // dst[3]
    return h if h >= 1 and h == w and src[2] == h * dst[2] and src[3] == w * dst[3] else None


def skip_obstacle(work: Workbench, source: fx.Node, target: fx.Node, overwritten: dict[fx.Node, str]) -> str | None:
    """Why a zero skip from ``source`` into ``target`` is not possible; None if it is."""
    position = work.index.position
    if position[source] >= position[target]:
        return f"'{source.name}' does not come before '{target.name}'; a skip must run forward"
    s, d = work.shape(source), work.shape(target)
    if s is None or d is None or len(s) != len(d) or len(s) not in (2, 4):
        return f"skips join two (N, C, H, W) or two (N, F) values; these are {s} and {d}"
    for node in (source, target):
        layout = work.analysis.layout(node.name)
        if layout is not None and layout.dim != 1:
            return f"the channels of '{node.name}' are on dim {layout.dim}, not dim 1"
    if len(s) == 4 and _factor(s, d) is None:
        return f"the source is {s[2]}x{s[3]}, not an integer multiple of the destination's {d[2]}x{d[3]}"
    if source in overwritten:
        return (
            f"'{source.name}' is overwritten in place later (by '{overwritten[source]}'); name that op's output instead"
        )
    return None


def _skip_layer(src: tuple[int, ...], dst: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    if len(src) == 4:
        stride = _factor(src, dst)
        assert stride is not None, "skip_obstacle has checked that the source is a multiple of the destination"
        layer: nn.Module = nn.Conv2d(src[1], dst[1], 1, stride=stride, dtype=dtype)
    else:
        layer = nn.Linear(src[1], dst[1], dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():  # its weight and bias
            p.zero_()
    return layer


def _anchors(work: Workbench) -> list[tuple[fx.Node, str]]:
    """Ends of single module calls, named by the outermost module ending there, in graph order."""
    names: dict[fx.Node, str] = {}
    for path in sorted(work.index.module_calls, key=lambda p: p.count(".")):
        calls = work.index.module_calls[path]
        if len(calls) == 1:
            names.setdefault(work.index.nodes[max(calls[0])], path)
    return [(n, names[n]) for n in work.value_nodes() if n in names]


def skip_sites(work: Workbench) -> list[str]:
    """Every ``"src->dst"`` pair of module-call ends a zero skip can join, in graph order."""
    overwritten = overwritten_in_place(work.gm)
    anchors = _anchors(work)
    return [
        f"{a_name}{SITE_JOIN}{b_name}"
        for i, (b, b_name) in enumerate(anchors)
        for a, a_name in anchors[:i]
        if skip_obstacle(work, a, b, overwritten) is None
    ]


def _propose(rng: random.Random, work: Workbench) -> Proposal | None:
    found = skip_sites(work)
    return (rng.choice(found), {}) if found else None


register_op(GrowthOp("add_skip", add_skip, ("src", "dst"), skip_sites, _propose, probability=0.15))
