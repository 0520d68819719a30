"""widen_kernel: grow a Conv2d's kernel (3x3 -> 5x5) by zero padding, with the padding grown to match.

The old kernel sits at the centre of the new one and the new taps are zero; the
padding grows by ``(K - k) / 2 * dilation`` per side, so every output reads the same
inputs with the same weights. ``padding="same"`` is kept, ``"valid"`` becomes the
numbers that keep the output size.

>>> import torch, torchvision, growth
>>> net = torchvision.models.resnet18().eval()
>>> wide = growth.widen_kernel(net, "layer1.0.conv1", kernel_size=5).eval()
>>> wide.layer1[0].conv1
Conv2d(64, 64, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2), bias=False)
>>> x = torch.randn(1, 3, 64, 64)
>>> bool((wide(x) - net(x)).abs().max() <= 1e-4 * net(x).abs().max())
True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import fx, nn

from growth.errors import GrowthError
from growth.graphedit import Workbench
from growth.registry import MAX_KERNEL, GrowthOp, Proposal, not_applicable, register_op


def widen_kernel(
    model: nn.Module,
    at: str,
    kernel_size: int | tuple[int, int] = 5,
    *,
    example_input: Any = None,
    check: bool = False,
) -> fx.GraphModule:
    """Zero-pad the kernel of the Conv2d ``at`` to ``kernel_size`` (an int or (height, width)).

    Args:
        model: any fx-traceable module; it is not modified.
        at: a Conv2d module path (or its fx node name).
        kernel_size: the new kernel; each side must grow by an even amount (or stay).
        example_input, check: see :func:`growth.net2wider`.

    >>> import torch, torchvision, growth
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> wide = growth.widen_kernel(net, "layer2.0.conv1", 5, check=True).eval()
    >>> wide.layer2[0].conv1.kernel_size
    (5, 5)
    >>> x = torch.randn(2, 3, 32, 32)
    >>> bool((wide(x) - net(x)).abs().max() < 1e-4)
    True
    """
    size = _pair(kernel_size)
    if max(size) > MAX_KERNEL:
        raise GrowthError(f"kernel_size={kernel_size} is larger than a step creates (at most {MAX_KERNEL})")
    work = Workbench(model, example_input)
    node = work.node(at)
    reason = kernel_obstacle(work, node, size)
    if reason is not None:
        raise not_applicable("widen_kernel", at, reason, kernel_sites(work, kernel_size))
    owner, _, attr = str(node.target).rpartition(".")
    setattr(work.gm.get_submodule(owner) if owner else work.gm, attr, widened_conv(work.layer(node, nn.Conv2d), size))
    return work.finish(
        "widen_kernel", check, at=at, kernel_size=list(size) if isinstance(kernel_size, (tuple, list)) else kernel_size
    )


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _new_padding(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int] | str:
    if conv.padding == "same":
        return "same"
    old = (0, 0) if conv.padding == "valid" else cast("tuple[int, int]", conv.padding)  # a Conv2d's: two ints
    top, left = (p + (new - k) // 2 * d for p, new, k, d in zip(old, size, conv.kernel_size, conv.dilation))
    return top, left


def kernel_obstacle(work: Workbench, node: fx.Node, size: tuple[int, int]) -> str | None:
    """Why the kernel of ``node`` cannot grow to ``size`` exactly; None if it can."""
    conv = work.module(node)
    if not isinstance(conv, nn.Conv2d):
        what = type(conv).__name__ if conv is not None else f"a {node.op} node"
        return f"it is {what}, not a Conv2d"
    old = tuple(conv.kernel_size)
    if any(new < k for new, k in zip(size, old)) or tuple(size) == old:
        return f"its kernel is {old[0]}x{old[1]}, which {size[0]}x{size[1]} does not enlarge"
    if any((new - k) % 2 for new, k in zip(size, old)):
        return f"its {old[0]}x{old[1]} kernel can only grow by an even amount per side to keep its centre"
    padding = _new_padding(conv, size)
    if conv.padding_mode in ("reflect", "circular") and isinstance(padding, tuple):  # not "same"
        spatial = work.known_shape(node.args[0])[2:]
        if any(p >= s for p, s in zip(padding, spatial)):
            return f"{conv.padding_mode} padding of {padding} needs inputs larger than that (they are {spatial})"
    return None


def widened_conv(conv: nn.Conv2d, size: tuple[int, int]) -> nn.Conv2d:
    """A copy of ``conv`` with a zero-padded ``size`` kernel and the padding that keeps its function."""
    wide = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        size,
        stride=_pair(conv.stride),
        padding=_new_padding(conv, size),
        dilation=_pair(conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        dtype=conv.weight.dtype,
    )
    top, left = ((new - k) // 2 for new, k in zip(size, conv.kernel_size))
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :, top : top + conv.kernel_size[0], left : left + conv.kernel_size[1]] = conv.weight
        if conv.bias is not None and wide.bias is not None:
            wide.bias.copy_(conv.bias)
    wide.weight.requires_grad_(conv.weight.requires_grad)
    return wide.train(conv.training)


def kernel_sites(work: Workbench, kernel_size: int | tuple[int, int] = 5) -> list[str]:
    """Every Conv2d whose kernel can grow to ``kernel_size``, in graph order."""
    size = _pair(kernel_size)
    return [
        work.site_name(n)
        for n in work.gm.graph.nodes
        if n.op == "call_module" and kernel_obstacle(work, n, size) is None
    ]


def _propose(rng: random.Random, work: Workbench) -> Proposal | None:
    """A Conv2d whose kernel grows by 2 per side (3x3 -> 5x5, 7x7 -> 9x9, 1x7 -> 3x9)."""
    options = []
    for node in work.gm.graph.nodes:
        conv = work.module(node)
        if isinstance(conv, nn.Conv2d):
            size = (conv.kernel_size[0] + 2, conv.kernel_size[1] + 2)
            if kernel_obstacle(work, node, size) is None:
                options.append((work.site_name(node), list(size)))
    if not options:
        return None
    site, kernel = rng.choice(options)
    return site, {"kernel_size": kernel}


register_op(GrowthOp("widen_kernel", widen_kernel, ("at",), kernel_sites, _propose, probability=0.1))
