"""Channel rules for layer norms (``nn.LayerNorm`` and ``F.layer_norm``): channels in the normalised dims.

Their affine parameters follow the channels, which can be permuted but not replicated
(replicating a channel changes the statistics the norm computes).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import fx, nn

from surgery.channels.groups import Endpoint, Layout
from surgery.channels.registry import _FUNCTION_RULES, _MODULE_RULES, _register
from surgery.channels.rules.arguments import _arg
from surgery.channels.walk import _Walk


def _normalised_over(w: _Walk, node: fx.Node, normalized_ndim: int, params: Sequence[tuple[str, str]]) -> Layout | None:
    """Layer norms: channels in the normalised dims cannot be replicated (statistics change) but can be permuted."""
    x = node.args[0]
    layout = w.layout(x)
    ndim = len(w.shape(x) or ())
    if layout is None or layout.dim < ndim - normalized_ndim:
        return layout
    w.block(
        [layout],
        f"{w.describe(node)} normalises over these channels: replicating them changes its statistics",
        replication_only=True,
    )
    for target, kind in params:
        w.add(
            layout, "followers", Endpoint(node.name, target, kind, node.name, dim=layout.dim - (ndim - normalized_ndim))
        )
    return layout


@_register(_MODULE_RULES, [nn.LayerNorm])
def _layernorm_module(w: _Walk, node: fx.Node, ln: nn.LayerNorm) -> Layout | None:
    params = [(str(node.target), "LayerNorm")] if ln.elementwise_affine else []
    return _normalised_over(w, node, len(ln.normalized_shape), params)


@_register(_FUNCTION_RULES, [F.layer_norm])
def _layernorm_function(w: _Walk, node: fx.Node) -> Layout | None:
    normalized = _arg(node, 1, "normalized_shape")
    params = []
    for pos, name in ((2, "weight"), (3, "bias")):
        p = _arg(node, pos, name)
        if isinstance(p, fx.Node):
            if p.op != "get_attr":
                w.block([w.layout(node.args[0])], f"{w.describe(node)} takes a computed {name}")
                continue
            params.append((str(p.target), "parameter"))
    return _normalised_over(w, node, len(normalized), params)
