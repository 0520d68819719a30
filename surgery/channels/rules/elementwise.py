"""Channel rules for elementwise ops: activations and dropout pass channels through, arithmetic couples them.

The ops are named once in :mod:`surgery.graph.ops` and registered here in all their
forms (``torch.relu``, ``x.relu()``, ``aten.relu.default``). Unary modules, functions
and methods keep their input's layout; broadcasting binary ops (``+``, ``*``, ...) join
the groups of same-size operands, and a parameter they combine with the channels
(ConvNeXt's layer scale, say, possibly reshaped to broadcast) follows them.
"""

from __future__ import annotations

from torch import fx, nn

from surgery.channels.groups import Endpoint, Layout
from surgery.channels.registry import _MODULE_RULES, _register, register_rule
from surgery.channels.rules.arguments import _parameter_source, _shape_of
from surgery.channels.shapes import ELEMENTWISE_MODULES
from surgery.channels.walk import _fallback, _Walk
from surgery.graph.ops import targets


@_register(_MODULE_RULES, ELEMENTWISE_MODULES)
def _pass_module(w: _Walk, node: fx.Node, module: nn.Module) -> Layout | None:
    return w.layout(node.args[0]) if node.args else None


# One list of names, all their forms (functions, tensor methods and the aten ops of exported graphs).
UNARY = (
    *("relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_"),
    *("tanh", "elu", "selu", "mish", "softplus", "hardtanh", "erf", "pow", "neg", "abs"),
    *("dropout", "dropout2d", "stochastic_depth"),
    *("to", "to_device", "float", "double", "type_as", "alias", "clone", "contiguous", "detach"),
)
BINARY = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")


@register_rule(*targets(*UNARY))
def _unary(w: _Walk, node: fx.Node) -> Layout | None:
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node) and a in w.layouts]
    if others:
        _fallback(w, node)
        return None
    return w.layout(node.args[0])


@register_rule(*targets(*BINARY))
def _binary(w: _Walk, node: fx.Node) -> Layout | None:
    """Broadcasting elementwise ops: same-size tracked operands couple their groups."""
    out_shape = w.shape(node)
    if out_shape is None:
        return None
    ndim = len(out_shape)
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and w.shape(a) is not None]
    tracked = [(a, lay) for a in operands if a in w.layouts and (lay := w.layout(a)) is not None]
    if not tracked:
        return None
    aligned = {a: lay.dim + ndim - len(_shape_of(w, a)) for a, lay in tracked}
    full = [(a, lay) for a, lay in tracked if _shape_of(w, a)[lay.dim] == out_shape[aligned[a]] and lay.size > 1]
    for a, lay in tracked:
        if (a, lay) not in full:
            w.block([lay], f"{w.describe(node)} broadcasts these channels against a wider dim")
    if not full:
        return None
    dims = {aligned[a] for a, _ in full}
    layouts = [lay for _, lay in full]
    if len(dims) > 1:
        w.block(layouts, f"{w.describe(node)} combines channels that sit on different dims")
        return None
    if not w.couple(layouts, node, "combines"):
        return None
    out = layouts[0].at(dims.pop())
    for a in operands:
        if a in w.layouts:
            continue
        shape = _shape_of(w, a)
        own = out.dim - (ndim - len(shape))
        if own < 0 or shape[own] == 1:
            continue
        source = _parameter_source(w, a, own)
        if source is not None:
            w.add(out, "followers", Endpoint(node.name, source[0], "parameter", node.name, dim=source[1]))
        else:
            w.block(
                [out], f"{w.describe(node)} combines them with '{a.name}', a value the channel analysis does not follow"
            )
    return out
