"""The rule tables of the channel analysis: which rule gives the output layout of each kind of call.

A rule is registered per module class (:data:`_MODULE_RULES`, looked up along the
class's MRO), per function (:data:`_FUNCTION_RULES`) or per tensor method name
(:data:`_METHOD_RULES`) with :func:`_register`. The walk
(:mod:`surgery.channels.walk`) looks rules up here; the rule families in
:mod:`surgery.channels.rules` fill the tables when they are imported.

A rule that leaves a channel count written in the graph (a slice bound, split sizes)
records it as a *literal* endpoint of kind ``k`` and registers in :data:`_LITERAL_EDITS`
how to rewrite that node when the widths change (:func:`surgery.channels.remap.remap_channels`
calls it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import fx

from surgery.channels.groups import Endpoint, Layout

# A rule is called as ``rule(walk, node, module)`` (module rules) or ``rule(walk, node)`` and returns the
# node's output Layout, a tuple of them for a tuple-valued output (``torch.split``), or None. The walk's
# class is not named here: the walk imports this module.
ModuleRule = Callable[..., "Layout | tuple[Layout | None, ...] | None"]
NodeRule = Callable[..., "Layout | tuple[Layout | None, ...] | None"]
# ``edit(node, endpoint, moved, size)`` rewrites the channel counts ``node`` spells out: ``moved(p)`` is the
# new position of old position ``p`` (a segment boundary) along the channel dim, of size ``size``, of the
# input ``endpoint.space``; ``endpoint.dim`` says where in the arguments the count is (rule-specific).
LiteralEdit = Callable[[fx.Node, Endpoint, Callable[[int], int], int], None]
_MODULE_RULES: dict[type, ModuleRule] = {}
_FUNCTION_RULES: dict[Any, NodeRule] = {}
_METHOD_RULES: dict[str, NodeRule] = {}
_LITERAL_EDITS: dict[str, LiteralEdit] = {}


def _register(table: dict[Any, Any], keys: Iterable[Any]) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        for k in keys:
            table[k] = fn
        return fn

    return deco
