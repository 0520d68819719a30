"""The rule tables of the channel analysis and the weight edits that go with them.

A *channel rule* gives the output layout of one kind of call; it is registered per
module class (looked up along the class's MRO), per function or aten operator, or per
tensor method name, all with :func:`register_rule` (the key's type says which table).
A layer type's *weight edit* (:class:`~surgery.channels.edits.WeightEdit`: what it does
with a channel map on its output, input or both) is registered with
:func:`register_edit`, by class or, for classes of optional packages, by class name, in
the same module as the layer's rule, so a new layer type touches one place. The walk
(:mod:`surgery.channels.walk`) looks rules up here, :func:`surgery.channels.remap.remap_channels`
the edits; the rule families in :mod:`surgery.channels.rules` fill the tables when imported.

A rule that leaves a channel count written in the graph (a slice bound, split sizes)
records it as a *literal* endpoint of kind ``k`` and registers in :data:`LITERAL_EDITS`
how to rewrite that node when the widths change; attention's head-sized tensors are
endpoints whose kind names an index function in :data:`HEAD_EDITS`.

Every table is a :class:`~surgery.core.registry.Registry`:

>>> import torch
>>> from torch import nn
>>> from surgery.channels.registry import FUNCTION_RULES, MODULE_RULES, WEIGHT_EDITS
>>> FUNCTION_RULES.get(torch.relu).__name__, MODULE_RULES.for_class(nn.Conv2d).__name__
('_unary', '_conv')
>>> WEIGHT_EDITS.for_class(nn.BatchNorm2d).through.__name__
'_batchnorm_through'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx

from surgery.channels.edits import ChannelMap, WeightEdit
from surgery.channels.groups import Endpoint, Layout
from surgery.core.registry import Registry

# A rule is called as ``rule(walk, node, module)`` (module rules) or ``rule(walk, node)`` and returns the
# node's output Layout, a tuple of them for a tuple-valued output (``torch.split``), or None. The walk's
# class is not named here: the walk imports this module.
ModuleRule = Callable[..., "Layout | tuple[Layout | None, ...] | None"]
NodeRule = Callable[..., "Layout | tuple[Layout | None, ...] | None"]
# ``edit(node, endpoint, moved, size)`` rewrites the channel counts ``node`` spells out: ``moved(p)`` is the
# new position of old position ``p`` (a segment boundary) along the channel dim, of size ``size``, of the
# input ``endpoint.space``; ``endpoint.dim`` says where in the arguments the count is (rule-specific).
LiteralEdit = Callable[[fx.Node, Endpoint, Callable[[int], int], int], None]
# ``index(old, new, heads)``: the positions a head-sized tensor keeps when ``heads`` heads shrink ``old`` -> ``new``
HeadEdit = Callable[[int, int, int], torch.Tensor]

MODULE_RULES: Registry[ModuleRule, type] = Registry("channel rule for modules")
FUNCTION_RULES: Registry[NodeRule, Any] = Registry("channel rule for functions")
METHOD_RULES: Registry[NodeRule] = Registry("channel rule for tensor methods")
LITERAL_EDITS: Registry[LiteralEdit] = Registry("literal edit")
HEAD_EDITS: Registry[HeadEdit] = Registry("attention head edit")
WEIGHT_EDITS: Registry[WeightEdit, type | str] = Registry("weight edit")
# the names the rule families import
_MODULE_RULES, _FUNCTION_RULES, _METHOD_RULES = MODULE_RULES, FUNCTION_RULES, METHOD_RULES
_LITERAL_EDITS = LITERAL_EDITS


def _table(key: Any) -> Registry[Any, Any]:
    """The table a key belongs in: a class -> module rules, a method name -> method rules, else function rules."""
    if isinstance(key, type):
        return MODULE_RULES
    return METHOD_RULES if isinstance(key, str) else FUNCTION_RULES


def register_rule(*keys: Any, replace: bool = False) -> Callable[[Any], Any]:
    """A decorator registering a channel rule for each key: a module class, a tensor method name, a function.

    A module rule is called ``rule(walk, node, module)``, the others ``rule(walk, node)``; it
    returns the node's output :class:`~surgery.channels.groups.Layout` (None: not followed).
    ``surgery.graph.ops.targets(...)`` gives every form of an op at once.

    >>> import torch
    >>> from surgery.channels import analyze_channels, register_rule
    >>> class Net(torch.nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.conv, self.head = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 2, 1)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return self.head(self.conv(x).exp())
    >>> x = torch.randn(1, 3, 8, 8)
    >>> analyze_channels(Net(), x).group_at("conv").obstacle(replicate=False)
    "'exp' (.exp()) does something to them the channel analysis does not follow"
    >>> @register_rule("exp")
    ... def _exp(walk, node):  # elementwise: the channels stay where they are
    ...     return walk.layout(node.args[0])
    >>> print(analyze_channels(Net(), x).group_at("conv").obstacle(replicate=False))
    None
    >>> METHOD_RULES.unregister("exp")
    """

    def deco(fn: Any) -> Any:
        for key in keys:
            _table(key).register(key, fn, replace=replace)
        return fn

    return deco


def _register(table: Registry[Any, Any], keys: Iterable[Any]) -> Callable[[Any], Any]:
    """``rule`` registered in ``table`` under each of ``keys`` (the rule families' form of :func:`register_rule`)."""

    def deco(fn: Any) -> Any:
        for k in keys:
            table.register(k, fn)
        return fn

    return deco


def register_edit(
    layer: type | str,
    *,
    out: Callable[[Any, ChannelMap], None] | None = None,
    inp: Callable[[Any, ChannelMap, float, torch.Generator | None], None] | None = None,
    through: Callable[[Any, ChannelMap, Endpoint], None] | None = None,
    replace: bool = False,
) -> WeightEdit:
    """Register how layers of class ``layer`` (or of that class name) take a channel map; returns the record.

    ``out(layer, map)``: the layer writes the channels (new rows); ``inp(layer, map, noise,
    generator)``: it reads them (new input columns, see :func:`surgery.channels.edits.read_columns`);
    ``through(layer, map, endpoint)``: it passes them through (BatchNorm, a depthwise conv).
    Subclasses use their nearest registered base's edit; ``tests/test_registries.py`` adds a
    layer type (its rule and its edit) and grows it with ``growth.net2wider``.

    >>> import torch
    >>> from torch import nn
    >>> from surgery.channels import register_edit
    >>> from surgery.channels.edits import take_rows
    >>> def scale_through(layer, m, endpoint):  # per-channel parameters follow the channels
    ...     take_rows(layer, m, ("scale",))
    >>> class Scale(nn.Module):
    ...     def __init__(self, channels: int) -> None:
    ...         super().__init__()
    ...         self.scale = nn.Parameter(torch.arange(channels, dtype=torch.float))
    >>> edit = register_edit(Scale, through=scale_through)
    >>> layer = Scale(3)
    >>> WEIGHT_EDITS.for_class(Scale).through(layer, ChannelMap.permutation([2, 0, 1]), None)
    >>> layer.scale.data
    tensor([2., 0., 1.])
    >>> WEIGHT_EDITS.unregister(Scale)
    """
    edit = WeightEdit(out, inp, through)
    return WEIGHT_EDITS.register(layer, edit, replace=replace)
