"""Channel rules for concatenation (``torch.cat`` and its aliases).

Along the channel dim, the inputs' groups are laid side by side as segments of the
output; along another dim (tokens, say), every input must carry the same channels, and a
parameter concatenated there (ViT's class token) follows them.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from surgery.channels.groups import Endpoint, Layout, Segment
from surgery.channels.registry import register_rule
from surgery.channels.rules.arguments import _arg, _norm, _parameter_source, _shape_of
from surgery.channels.walk import _fallback, _Walk
from surgery.graph.ops import targets


@register_rule(*targets("cat", "concatenate"))
def _cat(w: _Walk, node: fx.Node) -> Layout | None:
    given = _arg(node, 0, "tensors")
    out_shape = w.shape(node)
    if not isinstance(given, (list, tuple)):  # a tuple-valued node (``torch.cat(x.split(n))``)
        _fallback(w, node)
        return None
    if out_shape is None:
        return None
    tensors = list(given)
    dim = _norm(_arg(node, 1, "dim", 0), len(out_shape))
    layouts = [w.layout(t) for t in tensors]
    if any(lay is not None and lay.dim != dim for lay in layouts):
        return _cat_aside(w, node, tensors, layouts, dim)
    segments: list[Segment] = []
    for t, lay in zip(tensors, layouts):
        if lay is None:
            size = _shape_of(w, t)[dim]
            unknown = w.new_group(size)
            w.draft(unknown).blockers.append(f"'{t.name}' enters concatenation {w.describe(node)} untracked")
            segments.append(Segment(unknown, size))
        else:
            segments.extend(lay.segments)
    return Layout(dim, tuple(segments))


def _cat_aside(w: _Walk, node: fx.Node, tensors: list[Any], layouts: list[Layout | None], dim: int) -> Layout | None:
    """Concatenation along another dim (tokens, say): every input carries the same channels.

    An input that is a parameter (a class token, possibly ``expand``-ed to the batch) follows
    them along its own dim: a changed channel takes the parameter's entries of its old channel.
    """
    present = [lay for lay in layouts if lay is not None]
    channel_dim = present[0].dim
    sources = [_parameter_source(w, t, channel_dim) for t, lay in zip(tensors, layouts) if lay is None]
    params = [p for p in sources if p is not None]
    if len(params) < len(sources) or any(lay.dim != channel_dim for lay in present) or channel_dim == dim:
        w.block(
            present, f"{w.describe(node)} concatenates these channels with values the channel analysis does not follow"
        )
        return None
    if not w.couple(present, node, "concatenates"):
        return None
    for target, own in params:
        w.add(present[0], "followers", Endpoint(node.name, target, "parameter", node.name, dim=own))
    return present[0]
