"""The shared mechanics of every growth op: a traced working copy, new layers spliced into it, the finish.

Each op opens a :class:`Workbench` on a deep copy of the model (the input is never
modified), finds its site, edits weights and/or inserts nodes, and calls
:meth:`Workbench.finish`, which recompiles, re-checks every shape, appends the op
to the model's recipe and optionally checks that the output did not move.

>>> import torch, torchvision
>>> from growth.graphedit import Workbench
>>> work = Workbench(torchvision.models.resnet18())
>>> node = work.node("layer2_0_relu")
>>> path, new_nodes = work.insert_chain(node, "layer2_0_relu", "extra", [torch.nn.Identity()])
>>> path, [n.name for n in new_nodes]
('layer2.0.extra0', ['layer2_0_extra0_0'])
>>> grown = work.finish("doc_example", check=True)
>>> grown.layer2[0].extra0
Sequential(
  (0): Identity()
)
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from typing import Any, TypeVar

import torch
from torch import fx, nn

from growth.check import check_preserved
from growth.errors import GrowthError
from surgery.channels import ChannelAnalysis, Shapes, analyze_channels, infer_shapes
from surgery.core.errors import SurgeryError
from surgery.core.recipe import extend_recipe
from surgery.core.util import first_line
from surgery.graph.capture import trace, traced_copy
from surgery.graph.inputs import Example, InputSpec, check_example_size, declared_example
from surgery.graph.names import GraphIndex

_M = TypeVar("_M", bound=nn.Module)

STACK = "nn_module_stack"


class Workbench:
    """A traced deep copy of ``model`` being edited, with its shapes and channel analysis on demand.

    ``read_only=True`` skips the copy (the graph shares ``model``'s weights): for looking, not editing.
    """

    def __init__(self, model: nn.Module, example_input: Any = None, *, read_only: bool = False):
        if not isinstance(model, nn.Module):
            raise GrowthError(f"expected an nn.Module, got {type(model).__name__}")
        self.source = model
        self.example_input = Example.of(example_input)
        # no example: the input the model declares (a text model's tokens), else image sizes are tried
        self.guess = declared_example(model, batch=2) if self.example_input is None else None
        self.gm = (
            trace(model, example_input=self.example_input) if read_only else traced_copy(model, self.example_input)
        )

    @cached_property
    def analysis(self) -> ChannelAnalysis:
        """Channel coupling of the graph as it was before this op's edits."""
        return analyze_channels(self.gm, self.example_input if self.example_input is not None else self.guess)

    @property
    def shapes(self) -> Shapes:
        return self.analysis.shapes

    @cached_property
    def index(self) -> GraphIndex:
        return GraphIndex(self.gm.graph)

    def node(self, name: str) -> fx.Node:
        """The node a module path or fx node name refers to (one-line error with the closest names)."""
        return self.index.node(name)

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        return self.shapes.of.get(node.name)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def known_shape(self, value: Any) -> tuple[int, ...]:
        """The shape of ``value``, a tensor node by construction (a site an op has already checked)."""
        assert isinstance(value, fx.Node), f"expected a graph node, got {type(value).__name__}"
        shape = self.shape(value)
        assert shape is not None, f"no shape recorded for '{value.name}'"
        return shape

    def layer(self, node: fx.Node, cls: type[_M]) -> _M:
        """The module ``node`` calls, a ``cls`` by construction (a site an op has already checked)."""
        module = self.module(node)
        assert isinstance(module, cls), f"'{node.name}' calls {type(module).__name__}, not {cls.__name__}"
        return module

    def site_name(self, node: fx.Node) -> str:
        """The name users see for a node: its module path when it is a single call of a layer, else the fx name."""
        target = str(node.target)
        if node.op == "call_module" and len(self.index.module_calls.get(target, ())) == 1:
            return target
        return node.name

    def value_nodes(self) -> list[fx.Node]:
        """Nodes computing a tensor (no placeholders, parameters or output), in graph order."""
        return [n for n in self.gm.graph.nodes if n.op.startswith("call") and self.shape(n) is not None]

    # -- naming and placing new layers

    def parent_stack(self, node: fx.Node, name: str | None = None) -> OrderedDict[str, Any]:
        """The module calls a new node placed next to ``node`` belongs to.

        A container the user named (``name="layer2"``) holds the new layer itself; otherwise
        it joins the modules around ``node`` (not the leaf layer ``node`` calls).
        """
        stack = OrderedDict(node.meta.get(STACK) or {})
        keys = list(stack)
        named = [k for k in keys if k.partition("@")[0] == name]
        if named and not (node.op == "call_module" and str(node.target) == name):
            return OrderedDict((k, stack[k]) for k in keys[: keys.index(named[-1]) + 1])
        if node.op == "call_module" and keys and stack[keys[-1]][0] == str(node.target):
            keys = keys[:-1]
        return OrderedDict((k, stack[k]) for k in keys)

    def free_path(self, parent: str, stem: str) -> str:
        """``parent.stem{k}`` for the smallest k not taken."""
        taken = dict(self.gm.named_modules())
        prefix = f"{parent}." if parent else ""
        k = 0
        while f"{prefix}{stem}{k}" in taken:
            k += 1
        return f"{prefix}{stem}{k}"

    def insert_chain(
        self, anchor: fx.Node, name: str, stem: str, layers: Sequence[nn.Module], source: fx.Node | None = None
    ) -> tuple[str, list[fx.Node]]:
        """Insert ``layers`` (applied in order to ``source``, default ``anchor``) right after ``anchor``.

        They are registered as an ``nn.Sequential`` at a fresh path ``<parent>.<stem>{k}``
        (``name`` is the user's name for ``anchor``; see :meth:`parent_stack`) and called
        one by one, each node carrying the module stack of its place. Returns the path and
        the new nodes. Users of ``anchor`` are not rewired.
        """
        stack = self.parent_stack(anchor, name)
        parent = stack[next(reversed(stack))][0] if stack else ""
        path = self.free_path(parent, stem)
        self.gm.add_submodule(path, nn.Sequential(*layers))
        value = source if source is not None else anchor
        new_nodes: list[fx.Node] = []
        for i, layer in enumerate(layers):
            with self.gm.graph.inserting_after(new_nodes[-1] if new_nodes else anchor):
                value = self.gm.graph.call_module(f"{path}.{i}", (value,))
            value.meta[STACK] = OrderedDict(stack) | {
                path: (path, nn.Sequential),
                f"{path}.{i}": (f"{path}.{i}", type(layer)),
            }
            new_nodes.append(value)
        return path, new_nodes

    def insert_function(
        self,
        after: fx.Node,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        like: fx.Node,
        kwargs: dict[str, Any] | None = None,
    ) -> fx.Node:
        """A ``call_function`` node right after ``after``, in the module calls around ``like``."""
        with self.gm.graph.inserting_after(after):
            node = self.gm.graph.call_function(fn, args, kwargs or {})
        node.meta[STACK] = self.parent_stack(like)
        return node

    @staticmethod
    def reroute(old: fx.Node, new: fx.Node, keep: Sequence[fx.Node]) -> None:
        """Every user of ``old`` except ``keep`` (the new nodes that read it) reads ``new`` instead."""
        keep_set = set(keep)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep_set)

    # -- the end of every op

    def finish(self, op: str, check: bool = False, **args: Any) -> fx.GraphModule:
        """Recompile, re-check shapes, record ``op(**args)`` in the recipe, optionally check the output."""
        self.gm.graph.lint()
        self.gm.recompile()
        try:
            infer_shapes(self.gm, self.inputs())
        except SurgeryError as e:
            raise GrowthError(
                f"{op} produced a network that no longer runs ({e}); this is a bug, please report it"
            ) from None
        args.update(input_record(self.example_input))
        result = extend_recipe(self.gm, self.source, op, **args)
        if check:
            check_preserved(self.source, result, self.inputs(), op)
        return result

    def inputs(self) -> Example:
        """The example input if one was given, else the seeded random input of the shapes that ran."""
        return self.example_input if self.example_input is not None else self.shapes.example


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Default initialisation of new layers drawn from ``seed`` (the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def default_inputs(model: nn.Module, example_input: Any = None) -> Example:
    """What the ops check and measure on: ``example_input``, else a seeded random input of a size ``model`` runs on."""
    given = Example.of(example_input) or declared_example(model, batch=2)
    return given if given is not None else infer_shapes(trace(model)).example


def input_record(example: Example | None) -> dict[str, Any]:
    """How a recipe or log records the example an op ran on: ``input_shape`` for one float tensor, else ``inputs``."""
    if example is None:
        return {}
    specs = example.specs()
    if len(specs) == 1 and specs[0].name is None and specs[0].dtype.startswith("float"):
        return {"input_shape": list(specs[0].shape)}
    return {"inputs": [s.model_dump() for s in specs]}


def example_from_record(
    input_shape: list[int] | None = None, inputs: list[dict[str, Any]] | None = None
) -> Example | None:
    """The example an op recorded (see :func:`input_record`): zeros of the shape, or tensors of the specs."""
    if inputs:
        return Example.from_specs([InputSpec.model_validate(s) for s in inputs])
    if not input_shape:
        return None
    try:
        return Example((torch.zeros(check_example_size(list(input_shape))),), {})
    except (ValueError, TypeError) as e:
        raise GrowthError(f"the recorded input_shape {input_shape} is not an example input: {first_line(e)}") from None


def replay_of(op: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A recipe replay for ``op``: its recorded arguments, with ``input_shape`` turned back into an input."""

    def replay(
        model: nn.Module, input_shape: list[int] | None = None, inputs: list[dict[str, Any]] | None = None, **args: Any
    ) -> nn.Module:
        return op(model, **args, example_input=example_from_record(input_shape, inputs))

    # the op's own parameters, so a recipe's arguments can be checked before the call
    own = [p for name, p in inspect.signature(op).parameters.items() if name not in ("example_input", "check")]
    recorded = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("input_shape", "inputs")]
    replay.__signature__ = inspect.Signature([*own, *recorded])  # type: ignore[attr-defined]
    return replay
