"""Channel rules for layer norms (``nn.LayerNorm``, ``F.layer_norm``, ``aten.layer_norm``): normalised channels.

Their affine parameters follow the channels, which can be permuted freely. A replication
keeps the norm's mean and variance only when every channel is copied the same number of
times (a uniform replication: the factor must be an integer), so the group is marked
``uniform``. The ``normalized_shape`` a functional call spells out is rewritten when the
width changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from surgery.channels.edits import ChannelMap, set_tensor, take
from surgery.channels.groups import Endpoint, Layout
from surgery.channels.registry import _FUNCTION_RULES, _LITERAL_EDITS, _MODULE_RULES, _register, register_edit
from surgery.channels.rules.arguments import _arg, _node
from surgery.channels.walk import _Walk


def _normalised_over(w: _Walk, node: fx.Node, normalized_ndim: int, params: Sequence[tuple[str, str]]) -> Layout | None:
    """Layer norms: channels in the normalised dims cannot be replicated (statistics change) but can be permuted."""
    x = node.args[0]
    layout = w.layout(x)
    ndim = len(w.shape(x) or ())
    if layout is None or layout.dim < ndim - normalized_ndim:
        return layout
    w.require_uniform(layout, f"{w.describe(node)} normalises over these channels")
    if node.op == "call_function" and isinstance(_arg(node, 1, "normalized_shape"), (list, tuple)):
        w.add(
            layout, "literals", Endpoint(node.name, node.name, "normalized_shape", _node(x).name, dim=layout.dim - ndim)
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


def _rewrite_normalized_shape(node: fx.Node, ep: Endpoint, moved: Callable[[int], int], size: int) -> None:
    """The normalized_shape entry of the channel dim (``ep.dim`` counts from the end) becomes the new width."""
    shape = list(_arg(node, 1, "normalized_shape"))
    shape[ep.dim] = moved(size)
    if len(node.args) > 1:
        node.args = (node.args[0], type(_arg(node, 1, "normalized_shape"))(shape), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": shape}


_LITERAL_EDITS.register("normalized_shape", _rewrite_normalized_shape)


@_register(_FUNCTION_RULES, [F.layer_norm, torch.ops.aten.layer_norm.default])
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


def _layernorm_through(ln: nn.LayerNorm, m: ChannelMap, ep: Endpoint) -> None:
    """The weight edit of ``nn.LayerNorm``: its scale and shift follow the map along the endpoint's dim."""
    for name in ("weight", "bias"):
        t = getattr(ln, name, None)
        if t is not None:
            set_tensor(ln, name, take(t.detach(), ep.dim, m))
    shape = list(ln.normalized_shape)
    shape[ep.dim] = m.size
    ln.normalized_shape = tuple(shape)


register_edit(nn.LayerNorm, through=_layernorm_through)
