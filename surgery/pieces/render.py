"""Draw a traced model, or pieces as coloured clusters, with graphviz.

>>> import tempfile, torchvision, surgery
>>> pieces = surgery.cut(torchvision.models.resnet18(), "layer2")
>>> path = surgery.render(pieces, tempfile.mkdtemp() + "/pieces.dot")
>>> path.suffix
'.dot'

DOT text is always written; SVG/PNG/PDF need the graphviz ``dot`` binary.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import graphviz
from torch import fx, nn

from surgery.core.errors import SurgeryError
from surgery.core.specs import format_specs
from surgery.graph.capture import trace
from surgery.pieces.cut import Pieces, piece_info

_COLOURS = ("#dbeafe", "#dcfce7", "#fef3c7", "#fce7f3", "#ede9fe", "#e0f2fe", "#fee2e2", "#f1f5f9")
_FORMATS = ("dot", "gv", "svg", "png", "pdf")


def _label(n: fx.Node, owner: nn.Module) -> str:
    if n.op == "call_module":
        sub = owner.get_submodule(str(n.target))
        return f"{n.target}\n{type(sub).__name__}"
    if n.op in ("call_function", "call_method"):
        name = getattr(n.target, "__name__", str(n.target))
        return f"{n.name}\n{name}"
    return n.name


def _add_graph(dot: graphviz.Digraph, gm: fx.GraphModule, prefix: str) -> dict[str, str]:
    """Add gm's nodes (ids prefixed) and edges; returns {node name: dot id}."""
    ids: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            continue
        ids[n.name] = f"{prefix}{n.name}"
        shape = {"placeholder": "ellipse", "output": "ellipse"}.get(n.op, "box")
        dot.node(ids[n.name], _label(n, gm), shape=shape)
    for n in gm.graph.nodes:
        for src in n.all_input_nodes:
            if src.name in ids and n.name in ids:
                dot.edge(ids[src.name], ids[n.name])
    return ids


def to_dot(obj: nn.Module) -> graphviz.Digraph:
    """A graphviz Digraph of a model (traced) or of :class:`Pieces` (one cluster per piece)."""
    dot = graphviz.Digraph(
        "model", graph_attr={"rankdir": "TB"}, node_attr={"fontsize": "10", "style": "filled", "fillcolor": "white"}
    )
    if not isinstance(obj, Pieces):
        _add_graph(dot, obj if isinstance(obj, fx.GraphModule) else trace(obj), "")
        return dot
    previous_out: str | None = None
    for k, part in enumerate(obj):
        colour = _COLOURS[k % len(_COLOURS)]
        with dot.subgraph(name=f"cluster_{k}") as sub:
            sub.attr(
                label=f"piece {k}" if isinstance(part, fx.GraphModule) else f"{type(part).__name__} {k}",
                style="filled",
                color=colour,
            )
            if isinstance(part, fx.GraphModule):
                ids = _add_graph(sub, part, f"p{k}_")
                first_in = [ids[n.name] for n in part.graph.nodes if n.op == "placeholder"]
                out_id = next(ids[n.name] for n in part.graph.nodes if n.op == "output")
            else:
                out_id = f"p{k}_module"
                info = piece_info(part)
                label = f"{type(part).__name__}\n{format_specs(info.in_specs)} -> {format_specs(info.out_specs)}"
                sub.node(out_id, label, shape="box")
                first_in = [out_id]
        if previous_out is not None:
            info = piece_info(obj[k - 1])
            for i, target in enumerate(first_in):
                spec = info.out_specs[i] if info.out_specs and i < len(info.out_specs) else None
                dot.edge(previous_out, target, label=str(spec) if spec else "", penwidth="2")
        previous_out = out_id
    return dot


def render(obj: nn.Module, path: str | Path) -> Path:
    """Write ``obj`` as a graph to ``path``; the suffix picks the format (.dot/.gv/.svg/.png/.pdf).

    Returns the path written. Without the ``dot`` binary, SVG/PNG/PDF raise a clear
    :class:`SurgeryError` after writing the DOT text next to the requested file.

    >>> import tempfile, torchvision, surgery
    >>> pieces = surgery.cut(torchvision.models.resnet18(num_classes=10), "layer2")
    >>> path = surgery.render(pieces, tempfile.mkdtemp() + "/r18.dot")
    >>> path.suffix, path.read_text().startswith("digraph")
    ('.dot', True)
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "dot"
    if fmt not in _FORMATS:
        raise SurgeryError(f"cannot render to '.{fmt}'; use one of {', '.join('.' + f for f in _FORMATS)}")
    dot = to_dot(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("dot", "gv"):
        path.write_text(dot.source)
        return path
    if shutil.which("dot") is None:
        fallback = path.with_suffix(".dot")
        fallback.write_text(dot.source)
        raise SurgeryError(
            f"{fmt.upper()} needs the graphviz 'dot' binary, which is not installed; wrote {fallback} instead "
            "(install graphviz, e.g. apt-get install graphviz, or ask for a .dot file)"
        )
    path.write_bytes(dot.pipe(format=fmt))
    return path
