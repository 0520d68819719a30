"""Channel rules for attention layers that hold their own projections: ``nn.MultiheadAttention`` and
torchvision's windowed attention function (Swin).

In self-attention (query, key and value the same tensor, one in-projection) the layer
*consumes* the embedding channels on the last dim (the columns of ``in_proj_weight``) and
*produces* a new group (the rows of ``out_proj``) as element 0 of its output tuple. Both
can be permuted; neither can be replicated, since the embedding width is also the total
width of the heads (``embed_dim = num_heads * head_dim``). Both may shrink together to a
multiple of the heads (slimming: every head keeps the first channels of its queries,
keys and values).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from surgery.channels.edits import ChannelMap, head_index, qkv_index, read_columns, set_tensor
from surgery.channels.groups import Endpoint, Layout, Segment
from surgery.channels.registry import _FUNCTION_RULES, _MODULE_RULES, HEAD_EDITS, _register, register_edit
from surgery.channels.rules.arguments import _arg, _node
from surgery.channels.rules.layers import _linear_out
from surgery.channels.walk import _fallback, _Walk


@_register(_MODULE_RULES, [nn.MultiheadAttention])
def _multihead_attention(w: _Walk, node: fx.Node, mha: nn.MultiheadAttention) -> tuple[Layout | None, None] | None:
    query, key, value = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    shape = w.shape(query)
    if not (query is key is value) or not mha._qkv_same_embed_dim or shape is None:
        _fallback(w, node)
        return None
    last = len(shape) - 1
    reason = f"{w.describe(node)} splits these channels into {mha.num_heads} heads"
    layout = w.layout(query)
    if layout is not None and layout.dim != last:
        w.block([layout], f"{w.describe(node)} embeds dim {last} but these channels are on dim {layout.dim}")
    elif layout is not None:
        w.add(layout, "consumers", Endpoint(node.name, str(node.target), "MultiheadAttention", _node(query).name))
        w.require_multiple(layout, mha.num_heads, reason)
    outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    if len(outputs) != 1:
        return None, None
    out = Layout(last, (Segment(w.new_group(mha.embed_dim), mha.embed_dim),))
    w.add(out, "producers", Endpoint(node.name, str(node.target), "MultiheadAttention", outputs[0].name))
    w.require_multiple(out, mha.num_heads, reason)
    return out, None


def _windowed_attention(w: _Walk, node: fx.Node) -> Layout | None:
    """torchvision's ``shifted_window_attention(x, qkv_weight, proj_weight, bias, window, num_heads, ...)``
    on channels-last ``x``: a packed query-key-value projection of the channels into ``num_heads`` heads
    (their total width is the channels'), attention in windows, an output projection into a new group."""
    x = node.args[0] if node.args else None
    layout, shape = w.layout(x), w.shape(x)
    heads = _arg(node, 5, "num_heads")
    tensors = {name: _arg(node, pos, name) for pos, name in ((1, "qkv_weight"), (2, "proj_weight"), (9, "qkv_bias"))}
    tensors["proj_bias"] = _arg(node, 10, "proj_bias")
    given = {k: v for k, v in tensors.items() if v is not None}
    plain = all(isinstance(v, fx.Node) and v.op == "get_attr" for v in given.values())
    if layout is None or shape is None or not isinstance(heads, int) or not plain or len(given) < 2:
        _fallback(w, node)
        return None
    last = len(shape) - 1
    if layout.dim != last:
        w.block([layout], f"{w.describe(node)} attends over dim {last} but these channels are on dim {layout.dim}")
        _fallback(w, node)
        return None
    target = {k: str(v.target) for k, v in given.items()}
    source = _node(x).name
    w.add(layout, "consumers", Endpoint(node.name, target["qkv_weight"], "parameter", source, dim=1))
    for name, kind, dim in (
        ("qkv_weight", "heads_qkv", 0),
        ("qkv_bias", "heads_qkv", 0),
        ("proj_weight", "heads_inner", 1),
    ):
        if name in target:
            w.add(layout, "followers", Endpoint(node.name, target[name], kind, source, dim=dim, groups=heads))
    w.require_multiple(layout, heads, f"{w.describe(node)} splits these channels into {heads} heads")
    out_shape = w.shape(node)
    channels = out_shape[last] if out_shape is not None else shape[last]
    out = Layout(last, (Segment(w.new_group(channels), channels),))
    for name in ("proj_weight", "proj_bias"):
        if name in target:
            w.add(out, "producers", Endpoint(node.name, target[name], "parameter", node.name, dim=0))
    return out


try:  # torchvision is a dependency, but its private attention function may move
    from torchvision.models.swin_transformer import shifted_window_attention
except ImportError:  # pragma: no cover
    shifted_window_attention = None
if shifted_window_attention is not None:
    _register(_FUNCTION_RULES, [shifted_window_attention])(_windowed_attention)


# ----------------------------------------------------------------------------- weight edits


def _attention_out(mha: nn.MultiheadAttention, m: ChannelMap) -> None:
    _linear_out(mha.out_proj, m)


def _attention_in(mha: nn.MultiheadAttention, m: ChannelMap, noise: float, gen: torch.Generator | None) -> None:
    set_tensor(mha, "in_proj_weight", read_columns(mha.in_proj_weight.detach(), m, 1, noise, gen))
    if m.size != m.old:
        _attention_resize(mha, m.size)


def _attention_resize(mha: nn.MultiheadAttention, size: int) -> None:
    """Shrink the heads' total width to ``size`` (the embedding's): every head keeps its first channels of
    queries, keys and values, and ``out_proj`` the matching columns."""
    heads, old = mha.num_heads, mha.embed_dim
    inner, rows = head_index(old, size, heads), qkv_index(old, size, heads)
    new_head = size // heads
    set_tensor(mha, "in_proj_weight", mha.in_proj_weight.detach().index_select(0, rows))
    if mha.in_proj_bias is not None:
        set_tensor(mha, "in_proj_bias", mha.in_proj_bias.detach().index_select(0, rows))
    set_tensor(mha.out_proj, "weight", mha.out_proj.weight.detach().index_select(1, inner))
    mha.out_proj.in_features = size
    mha.embed_dim = mha.kdim = mha.vdim = size
    mha.head_dim = new_head


register_edit(nn.MultiheadAttention, out=_attention_out, inp=_attention_in)
# Tensors of attention whose size follows the embedding they read (the heads' total width), by endpoint kind:
# the rows of a packed query-key-value projection, the columns of the output projection.
HEAD_EDITS.register("heads_qkv", qkv_index)
HEAD_EDITS.register("heads_inner", head_index)
