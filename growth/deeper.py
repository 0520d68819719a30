"""net2deeper: insert an identity-initialised layer (conv or linear, with BatchNorm and ReLU) after a node.

The conv's kernel is zero but for a 1 at the centre tap of each channel's own input
(within its group when ``groups`` > 1); a BatchNorm inserted with it starts as the
identity in eval mode (and close to it in training mode: its statistics are those
of the value on the example input, and its scale and shift undo them); the ReLU
that follows (Net2Net's choice) keeps the function only where the value is never
negative, so such sites are checked and refused otherwise (``activation=None``
inserts a purely linear identity anywhere).

>>> import torch, torchvision, growth
>>> net = torchvision.models.resnet18().eval()
>>> deep = growth.net2deeper(net, "layer2_0_relu").eval()
>>> deep.layer2[0].net2deeper0
Sequential(
  (0): Conv2d(128, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (1): BatchNorm2d(128, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
  (2): ReLU()
)
>>> x = torch.randn(1, 3, 64, 64)
>>> bool((deep(x) - net(x)).abs().max() <= 1e-4 * net(x).abs().max())
True
"""

from __future__ import annotations

import operator
import random
import zlib
from typing import Any

import torch
from torch import fx, nn

from growth.block import block_obstacle, block_sites, insert_block_copy
from growth.check import evaluating
from growth.errors import GrowthError
from growth.graphedit import STACK, Workbench, seeded
from growth.registry import MAX_KERNEL, GrowthOp, Proposal, Site, not_applicable, register_op
from growth.signs import negative_reasons
from surgery.core.errors import renamed_argument

KINDS = ("conv", "linear", "block", "residual")
ACTIVATIONS = ("relu", None)


def net2deeper(
    model: nn.Module,
    at: str | None = None,
    kind: str = "conv",
    kernel_size: int = 3,
    groups: int = 1,
    batchnorm: bool = True,
    activation: str | None = "relu",
    *,
    example_input: Any = None,
    check: bool = False,
    after: str | None = None,
) -> fx.GraphModule:
    """Insert an identity layer after ``at``; every former reader of ``at`` reads the new layer.

    Args:
        model: any fx-traceable module; it is not modified.
        at: the module path or fx node name after which the layer goes (``kind="block"``: the module
            path of a residual block); :func:`growth.sites` lists them.
        kind: ``"conv"`` (kxk conv on dim 1 of an NCHW value), ``"linear"`` (on the last dim),
            ``"block"``: a copy of the residual block ``at`` inserted after it, every residual branch
            starting at zero (transformer layers, ConvNeXt and ResNet blocks; see :mod:`growth.block`), or
            ``"residual"``: a new basic residual block after the NCHW value ``at``, ``act(x + bn(conv(relu(bn(
            conv(x))))))`` with its last BatchNorm at zero (where the block before it changes the shape, as a
            ResNet stage's first block does, so that it has no copy that keeps the function).
        kernel_size: odd conv kernel size (padding ``k // 2`` keeps the spatial size).
        groups: conv groups; the identity stays within each group.
        batchnorm: insert an identity BatchNorm after the layer (``BatchNorm1d`` for linear, 2-D values only).
        activation: ``"relu"`` (needs a non-negative value at ``at``) or None.
        example_input, check: see :func:`growth.net2wider`.
        after: the former name of ``at`` (still accepted, with a ``FutureWarning``; recipes saved
            with it replay and record ``at``).

    >>> import torch, torchvision, growth
    >>> net = torchvision.models.resnet18(num_classes=10).eval()
    >>> deep = growth.net2deeper(net, at="layer2_0_relu", check=True).eval()
    >>> type(deep.layer2[0].net2deeper0[0]).__name__
    'Conv2d'
    >>> x = torch.randn(2, 3, 32, 32)
    >>> bool((deep(x) - net(x)).abs().max() < 1e-4)
    True
    """
    at = renamed_argument("net2deeper", "at", at, "after", after, GrowthError)
    if at is None:
        raise GrowthError(
            "net2deeper needs at=, the node to insert after; growth.sites(model, 'net2deeper') lists them"
        )
    _check_arguments(kind, kernel_size, groups, activation)
    work = Workbench(model, example_input)
    if kind == "block":
        reason = block_obstacle(work, at)
        if reason is not None:
            raise not_applicable("net2deeper", at, reason, block_sites(work))
        insert_block_copy(work, at)
        return work.finish("net2deeper", check, at=at, kind=kind)
    node = work.node(at)
    reason = deeper_obstacle(work, node, kind, groups, batchnorm, activation, negative_reasons(work.gm))
    if reason is not None:
        raise not_applicable("net2deeper", at, reason, deeper_sites(work, kind, groups, batchnorm, activation))
    shape = work.known_shape(node)
    channels = shape[1] if kind in ("conv", "residual") else shape[-1]
    if kind == "residual":
        _insert_residual(work, node, at, channels, kernel_size, groups, activation)
        return work.finish(
            "net2deeper", check, at=at, kind=kind, kernel_size=kernel_size, groups=groups, activation=activation
        )
    layers = identity_layers(kind, channels, kernel_size, groups, activation, work.shapes.dtype, bias=not batchnorm)
    if batchnorm:
        layers.insert(1, identity_batchnorm(kind, value_at(work, node)))
    _, new_nodes = work.insert_chain(node, at, "net2deeper", layers)
    work.reroute(node, new_nodes[-1], keep=new_nodes[:1])
    return work.finish(
        "net2deeper",
        check,
        at=at,
        kind=kind,
        kernel_size=kernel_size,
        groups=groups,
        batchnorm=batchnorm,
        activation=activation,
    )


def _check_arguments(kind: str, kernel_size: int, groups: int, activation: str | None) -> None:
    if kind not in KINDS:
        raise GrowthError(f"kind='{kind}' is not one of {', '.join(KINDS)}")
    if kernel_size < 1 or kernel_size % 2 == 0 or kernel_size > MAX_KERNEL:
        raise GrowthError(
            f"kernel_size={kernel_size} is not an odd size up to {MAX_KERNEL} with a centre tap; give 1, 3, 5, ..."
        )
    if groups < 1 or (kind == "linear" and groups != 1):
        raise GrowthError(f"groups={groups} is not possible for kind='{kind}'; give groups >= 1 (1 for linear)")
    if activation not in ACTIVATIONS:
        raise GrowthError(f"activation={activation!r} is not one of 'relu' or None")


def deeper_obstacle(
    work: Workbench,
    node: fx.Node,
    kind: str,
    groups: int,
    batchnorm: bool,
    activation: str | None,
    negative: dict[fx.Node, str | None],
) -> str | None:
    """Why an identity layer of this kind cannot go after ``node`` without changing the function; None if it can."""
    shape = work.shape(node)
    if shape is None:
        return "its output is not a tensor"
    layout = work.analysis.layout(node.name)
    if kind in ("conv", "residual"):
        if len(shape) != 4:
            return f"its output has shape {shape}; a conv needs (N, C, H, W), use kind='linear'"
        if layout is not None and layout.dim != 1:
            return f"its channels are on dim {layout.dim} (channels-last); use kind='linear'"
    else:
        if len(shape) < 2:
            return f"its output has shape {shape}; a Linear needs (N, ..., F)"
        if layout is not None and layout.dim != len(shape) - 1:
            return f"its channels are on dim {layout.dim}, not the last dim a Linear acts on; use kind='conv'"
        if batchnorm and len(shape) != 2:
            return (
                f"BatchNorm1d would normalise dim 1 of its {len(shape)}-D output, not the "
                "features; pass batchnorm=False"
            )
    channels = shape[1] if kind in ("conv", "residual") else shape[-1]
    if channels % groups:
        return f"its {channels} channels do not split into {groups} groups"
    if activation == "relu" and negative[node] is not None:
        return (
            f"{negative[node]}, which a ReLU after the identity layer would clip (pick a site "
            "after a ReLU, or activation=None)"
        )
    return None


def deeper_sites(
    work: Workbench,
    kind: str | None = None,
    groups: int = 1,
    batchnorm: bool = True,
    activation: str | None = "relu",
    kernel_size: int = 3,
) -> list[Site]:
    """Every site where net2deeper of this kind (default: every kind, in the order of ``KINDS``) keeps the function.

    Each site is a :class:`Site` whose ``args`` name its kind; within a kind, in graph order.
    """
    if kind is None:
        return [s for k in KINDS for s in deeper_sites(work, k, groups, batchnorm, activation, kernel_size)]
    _check_arguments(kind, kernel_size, groups, activation)
    if kind == "block":
        return [Site(path, kind=kind) for path in block_sites(work)]
    negative = negative_reasons(work.gm)
    return [
        Site(work.site_name(n), kind=kind)
        for n in work.value_nodes()
        if deeper_obstacle(work, n, kind, groups, batchnorm, activation, negative) is None
    ]


def identity_layers(
    kind: str, channels: int, kernel_size: int, groups: int, activation: str | None, dtype: torch.dtype, bias: bool
) -> list[nn.Module]:
    """The identity conv (or Linear; zero ``bias`` if asked for), then a ReLU if asked for."""
    layer: nn.Conv2d | nn.Linear
    if kind == "conv":
        layer = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias, dtype=dtype
        )
        weight = torch.zeros_like(layer.weight)
        centre = kernel_size // 2
        own = torch.arange(channels)
        weight[own, own % (channels // groups), centre, centre] = 1
    else:
        layer = nn.Linear(channels, channels, bias=bias, dtype=dtype)
        weight = torch.eye(channels, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.zero_()
    return [layer, nn.ReLU()] if activation == "relu" else [layer]


def _insert_residual(
    work: Workbench, node: fx.Node, at: str, channels: int, kernel_size: int, groups: int, activation: str | None
) -> None:
    """``act(x + bn2(conv2(relu(bn1(conv1(x))))))`` after ``node``, ``bn2`` at zero: the identity where ``act``
    is (ReLU on a value that is never negative). The convs start as a fresh layer would, seeded by ``at``."""
    dtype = work.shapes.dtype
    with seeded(zlib.crc32(at.encode())):
        layers: list[nn.Module] = [
            nn.Conv2d(
                channels, channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False, dtype=dtype
            ),
            nn.BatchNorm2d(channels, dtype=dtype),
            nn.ReLU(),
            nn.Conv2d(
                channels, channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False, dtype=dtype
            ),
            nn.BatchNorm2d(channels, dtype=dtype),
        ]
    last = layers[-1]
    assert isinstance(last, nn.BatchNorm2d)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    _, branch = work.insert_chain(node, at, "net2deeper", layers)
    graph = work.gm.graph
    with graph.inserting_after(branch[-1]):
        out = graph.call_function(operator.add, (node, branch[-1]))
    out.meta[STACK] = branch[-1].meta[STACK]
    users = [*branch[:1], out]
    if activation == "relu":
        with graph.inserting_after(out):
            out = graph.call_function(torch.relu, (out,))
        out.meta[STACK] = branch[-1].meta[STACK]
        users.append(out)
    work.reroute(node, out, keep=users)


def value_at(work: Workbench, node: fx.Node) -> torch.Tensor:
    """``node``'s value on the example input, in eval mode (copied before any in-place op can change it)."""
    seen: dict[str, torch.Tensor] = {}

    class Capture(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            if n is node:
                seen["value"] = out.detach().clone()
            return out

    with evaluating(work.gm):
        Capture(work.gm).run(*work.inputs().flat(work.gm.graph), enable_io_processing=False)
    return seen["value"]


def identity_batchnorm(kind: str, value: torch.Tensor) -> nn.Module:
    """A BatchNorm that returns ``value``-like inputs unchanged: in eval mode exactly, in training nearly.

    Its running statistics are ``value``'s per-channel mean and variance, and its scale
    and shift undo them (``weight = sqrt(var + eps)``, ``bias = mean``): the identity in
    eval mode whatever the statistics, and close to it in training mode, where batches
    with statistics like ``value``'s are normalised and scaled straight back.
    """
    dims = [0, 2, 3] if kind == "conv" else [0]
    bn = (nn.BatchNorm2d if kind == "conv" else nn.BatchNorm1d)(value.shape[1], dtype=value.dtype)
    mean, var = value.mean(dims), value.var(dims, unbiased=False)
    assert bn.running_mean is not None and bn.running_var is not None, "a new BatchNorm tracks its statistics"
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(mean)
    return bn


def _propose(rng: random.Random, work: Workbench) -> Proposal | None:
    options = [s for s in deeper_sites(work) if s.args["kind"] != "residual"]  # copied blocks, not new ones
    if not options:
        return None
    site = rng.choice(options)
    kind = site.args["kind"]
    if kind in ("conv", "residual"):
        return str(site), {"kind": kind, "kernel_size": rng.choice([1, 3])}
    return str(site), {"kind": kind}


register_op(GrowthOp("net2deeper", net2deeper, ("at",), deeper_sites, _propose, probability=0.3))
