"""Channel rules for attention layers that hold their own projections: ``nn.MultiheadAttention``.

In self-attention (query, key and value the same tensor, one in-projection) the layer
*consumes* the embedding channels on the last dim (the columns of ``in_proj_weight``) and
*produces* a new group (the rows of ``out_proj``) as element 0 of its output tuple. Both
can be permuted; neither can be replicated, since the embedding width is also the total
width of the heads (``embed_dim = num_heads * head_dim``).
"""

from __future__ import annotations

import operator

from torch import fx, nn

from surgery.channels.groups import Endpoint, Layout, Segment
from surgery.channels.registry import _MODULE_RULES, _register
from surgery.channels.rules.arguments import _arg
from surgery.channels.walk import _fallback, _Walk


@_register(_MODULE_RULES, [nn.MultiheadAttention])
def _multihead_attention(w: _Walk, node: fx.Node, mha: nn.MultiheadAttention) -> tuple[Layout | None, None] | None:
    query, key, value = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    if not (query is key is value) or not mha._qkv_same_embed_dim or w.shape(query) is None:
        return _fallback(w, node)
    last = len(w.shape(query)) - 1
    reason = f"{w.describe(node)} splits these channels into {mha.num_heads} heads, whose width is fixed"
    layout = w.layout(query)
    if layout is not None and layout.dim != last:
        w.block([layout], f"{w.describe(node)} embeds dim {last} but these channels are on dim {layout.dim}")
    elif layout is not None:
        w.add(layout, "consumers", Endpoint(node.name, str(node.target), "MultiheadAttention", query.name))
        w.block([layout], reason, fixed_width=True)
    outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    if len(outputs) != 1:
        return None, None
    out = Layout(last, (Segment(w.new_group(mha.embed_dim), mha.embed_dim),))
    w.add(out, "producers", Endpoint(node.name, str(node.target), "MultiheadAttention", outputs[0].name))
    w.block([out], reason, fixed_width=True)
    return out, None
