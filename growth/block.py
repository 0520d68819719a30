"""net2deeper of a whole residual block: a copy of the block after it, with every residual branch starting at zero.

A residual block computes ``x + f1(x)`` (and ``... + f2(...)``: a transformer layer's
attention and MLP, a ConvNeXt or pre-activation ResNet block). Its copy, inserted right
after it, computes the identity when the last affine step of each branch is zero: the
projection's weights and bias, a layer scale, a branch-final BatchNorm's scale and
shift. Values the block also reads (attention masks, rotary tables) are read by the copy
too. A ReLU after the sum keeps the identity when the block's input is never negative
(post-activation ResNets); a norm after the sum (post-norm transformers such as BERT)
does not, and such blocks are refused with that reason.

>>> import torch, torchvision, growth
>>> net = torchvision.models.resnet18().eval()
>>> deep = growth.net2deeper(net, "layer1.1", kind="block").eval()
>>> deep.layer1.net2deeper0.conv2.weight.abs().sum().item(), deep.layer1.net2deeper0.bn2.weight.abs().sum().item()
(..., 0.0)
>>> x = torch.randn(1, 3, 64, 64)
>>> torch.equal(deep(x), net(x))
True
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import overload

import torch
import torch.nn.functional as F
from torch import fx, nn

from growth.graphedit import STACK, Workbench
from growth.signs import negative_reasons
from surgery.graph.ops import is_call as _is
from surgery.graph.ops import targets

FX, ATEN, METHOD = ("function",), ("aten",), ("method",)
RESIDUAL_SUMS = targets("add") | targets("add_", kinds=("function", "method"))  # the forms of a residual sum
# f(0) = 0, one tensor operand: a branch is zero when its input is
_ZERO_KEEPING = (
    targets("relu", "gelu", "silu", "dropout", "tanh", "hardswish", "getitem", kinds=FX)
    | targets("flatten", "permute", "transpose", "reshape", kinds=FX)
    | targets("gelu", "silu", "relu", "view", "permute", "transpose", "reshape", "clone", kinds=ATEN)
    | targets("permute", "transpose", "reshape", "view", "flatten", "contiguous", "clone", "relu", kinds=METHOD)
    | targets("mul", "mul_", kinds=METHOD)
)
_ZERO_KEEPING_MODULES = (
    nn.Dropout,
    nn.Identity,
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Tanh,
    nn.Flatten,
)
# steps that may sit on the residual path: casts to the same dtype, aliases, copies, and reshapes that keep the
# order of the elements (the block's output has its input's shape, so its reshapes undo each other)
_TRANSPARENT = (
    targets("to", "alias", "clone", "view", "reshape", "flatten", kinds=ATEN)
    | targets("to", "float", "type_as", "contiguous", "clone", "view", "reshape", "flatten", "unflatten", kinds=METHOD)
    | targets("reshape", "flatten", kinds=FX)
)
# the identity on non-negative values: after the sum they keep the copy the identity when the block's input is >= 0
_RELUS = targets("relu", "leaky_relu") | targets("relu_", kinds=METHOD)
_RELU_MODULES = (nn.ReLU, nn.LeakyReLU)
# norms called as functions (timm's BatchNormAct2d, LayerNorm2d), by the positions of their scale and shift
_NORM_FUNCTIONS = {
    F.batch_norm: (3, 4),
    F.layer_norm: (2, 3),
    F.group_norm: (2, 3),
    torch.ops.aten.batch_norm.default: (1, 2),
    torch.ops.aten.layer_norm.default: (2, 3),
    torch.ops.aten.group_norm.default: (2, 3),
    torch.ops.aten._native_batch_norm_legit_no_training.default: (1, 2),
}
_MULS = targets("mul") | targets("mul_", kinds=("function", "method"))
_AFFINE_FUNCTIONS = targets("linear") | targets("addmm", "conv2d", kinds=ATEN)


class _Block:
    """The nodes of one call of the block at ``path`` and how its residual sum is built."""

    def __init__(self, work: Workbench, path: str):
        calls = work.index.module_calls.get(path)
        if not calls or len(calls) != 1:
            raise ValueError("it is not a module called once" if calls else "it is not a module of the graph")
        self.work, self.path = work, path
        self.nodes = [work.index.nodes[i] for i in sorted(calls[0])]
        inside = set(self.nodes)
        outputs = [n for n in self.nodes if any(u not in inside for u in n.users)]
        if len(outputs) != 1:
            raise ValueError(f"it hands {len(outputs)} values on, not one")
        self.output = outputs[0]
        self.inside = inside

    def external(self, node: fx.Node) -> bool:
        return node not in self.inside

    @overload
    def through(self, value: fx.Node) -> fx.Node: ...

    @overload
    def through(self, value: fx.node.Argument) -> fx.node.Argument: ...

    def through(self, value: fx.node.Argument) -> fx.node.Argument:
        return _through(value, self.work, self.inside)

    def spine(self) -> tuple[fx.Node, list[fx.Node]]:
        """The block's input on the residual path and the branch values added to it (last first)."""
        node: fx.node.Argument = self.through(self.output)
        relu: fx.Node | None = None
        if isinstance(node, fx.Node) and (_is(node, _RELUS) or isinstance(self.work.module(node), _RELU_MODULES)):
            relu = node
            node = self.through(node.args[0])
        if isinstance(node, fx.Node) and self.external(node):
            raise ValueError("its output is its input (it computes nothing to copy)")
        if not isinstance(node, fx.Node):
            raise ValueError(f"its output is not a residual sum but the constant {node!r}")
        if not _is(node, RESIDUAL_SUMS):
            source = node.args[0] if node.args else None
            if isinstance(source, fx.Node) and _is(self.through(source), RESIDUAL_SUMS):
                raise ValueError(
                    f"{self.work.site_name(node)} follows its residual sum ({_after_sum(self.work, node)}): with zero "
                    "branches the copy would apply it to its input again instead of passing it on"
                )
            raise ValueError(f"its output is not a residual sum but {self.work.site_name(node)}")
        branches: list[fx.Node] = []
        while _is(node, RESIDUAL_SUMS):
            left, right = self.through(node.args[0]), self.through(node.args[1])
            spine_side = next((a for a in (left, right) if isinstance(a, fx.Node) and self._on_spine(a)), None)
            if spine_side is None:
                raise ValueError("neither operand of its residual sum is its input")
            branch = right if spine_side is left else left
            if not isinstance(branch, fx.Node):
                raise ValueError("its residual sum adds a constant to its input, not a branch")
            branches.append(branch)
            if self.external(spine_side):
                self.relu_after = relu
                return spine_side, branches
            node = spine_side
        raise ValueError("its residual sum does not reach its input")

    def _on_spine(self, node: fx.Node) -> bool:
        """Reaches the block input through residual sums (and value-preserving casts) only, or is it."""
        while True:
            node = self.through(node)
            if self.external(node):
                return True
            if not _is(node, RESIDUAL_SUMS):
                return False
            node = next((a for a in node.args[:2] if isinstance(a, fx.Node) and self._on_spine(a)), None)  # type: ignore[assignment]
            if node is None:
                return False


@overload
def _through(value: fx.Node, work: Workbench, inside: set[fx.Node]) -> fx.Node: ...


@overload
def _through(value: fx.node.Argument, work: Workbench, inside: set[fx.Node]) -> fx.node.Argument: ...


def _through(value: fx.node.Argument, work: Workbench, inside: set[fx.Node]) -> fx.node.Argument:
    """``value`` with value-preserving steps (casts, aliases, copies, ``nn.Identity``) of the block stepped over.

    It stops at the first value computed outside the block (``inside``): the block's input.
    """
    while (
        isinstance(value, fx.Node)
        and value in inside
        and (_is(value, _TRANSPARENT) or isinstance(work.module(value), nn.Identity))
        and value.args
        and isinstance(value.args[0], fx.Node)
    ):
        value = value.args[0]
    return value


def _after_sum(work: Workbench, node: fx.Node) -> str:
    """What kind of step follows a residual sum that is not the block's output: a norm (post-norm) or another op."""
    module = work.module(node)
    norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) or (
        node.op == "call_function" and node.target in _NORM_FUNCTIONS
    )
    return "post-norm" if norm else "not the identity on its input"


def _zero_points(work: Workbench, branch: fx.Node) -> list[tuple[str, list[str]]] | None:
    """What to zero so that ``branch`` is zero, also when it is a sum of branches (parallel attention and MLP)."""
    if _is(branch, RESIDUAL_SUMS):
        parts = [_zero_points(work, a) if isinstance(a, fx.Node) else None for a in branch.args[:2]]
        return None if any(p is None for p in parts) else [z for p in parts for z in p]  # type: ignore[union-attr]
    point = _zero_point(work, branch)
    return None if point is None else [point]


def _zero_point(work: Workbench, branch: fx.Node) -> tuple[str, list[str]] | None:
    """The module or parameters to zero so that ``branch`` is zero: ``(kind, targets)``; None if there is none."""
    node = branch
    for _ in range(64):
        if node.op == "call_module":
            module = work.module(node)
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)) or type(module).__name__ == "Conv1D":
                return "module", [str(node.target)]
            if (
                isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
                and module.weight is not None
            ):
                return "module", [str(node.target)]
            if isinstance(module, _ZERO_KEEPING_MODULES) or type(module).__name__ in (
                "DropPath",
                "StochasticDepth",
                "LayerScale",
            ):
                if type(module).__name__ == "LayerScale":
                    return "module", [str(node.target)]
                if not isinstance(node.args[0], fx.Node):
                    return None
                node = node.args[0]
                continue
            return None
        if _is(node, _MULS):  # a layer scale: x * gamma
            params = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op == "get_attr"]
            if params:
                return "parameters", [str(params[0].target)]
            node = next(a for a in node.args[:2] if isinstance(a, fx.Node))
            continue
        if node.op == "call_function" and node.target in _NORM_FUNCTIONS:
            return _norm_parameters(node)
        if node.op == "call_function" and node.target in _AFFINE_FUNCTIONS:
            names = [str(a.target) for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
            return ("parameters", names) if names else None
        if _is(node, _ZERO_KEEPING):
            if not isinstance(node.args[0], fx.Node):
                return None
            node = node.args[0]
            continue
        return None
    return None


def _norm_parameters(node: fx.Node) -> tuple[str, list[str]] | None:
    """The scale and shift of a norm called as a function, to zero (its statistics stay); None if it has no scale."""
    positions = _NORM_FUNCTIONS[node.target]  # type: ignore[index]
    found = [
        node.args[i] if len(node.args) > i else node.kwargs.get(name) for i, name in zip(positions, ("weight", "bias"))
    ]
    if not isinstance(found[0], fx.Node) or any(a is not None and not _is_attr(a) for a in found):
        return None
    return "parameters", [str(a.target) for a in found if isinstance(a, fx.Node)]


def _is_attr(value: object) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def block_obstacle(work: Workbench, path: str) -> str | None:
    """Why a zero-branch copy of the block at ``path`` would not be the identity; None if it would."""
    try:
        block = _Block(work, path)
        start, branches = block.spine()
    except ValueError as e:
        return str(e)
    if work.shape(start) is None or work.shape(start) != work.shape(block.output):
        return "its output is not the shape of its input"
    for branch in branches:
        if _zero_points(work, branch) is None:
            return (
                f"its branch ending at {work.site_name(branch)} has no last linear layer, norm "
                "or scale to start at zero"
            )
    if block.relu_after is not None and negative_reasons(work.gm)[start] is not None:
        return (
            f"{work.site_name(block.relu_after)} (the identity only on values >= 0) follows its residual sum and "
            f"its input can be negative ({negative_reasons(work.gm)[start]})"
        )
    return None


def block_sites(work: Workbench) -> list[str]:
    """Every module whose call is a residual block a zero-branch copy can follow, in graph order."""
    order = {n: i for i, n in enumerate(work.index.nodes)}
    found = [p for p, calls in work.index.module_calls.items() if len(calls) == 1 and block_obstacle(work, p) is None]
    return sorted(found, key=lambda p: order[work.index.nodes[max(work.index.module_calls[p][0])]])


def insert_block_copy(work: Workbench, path: str) -> str:
    """Insert the zero-branch copy of the block at ``path`` after it (in ``work.gm``); the copy's module path."""
    block = _Block(work, path)
    _, branches = block.spine()
    parent, _, _ = path.rpartition(".")
    new_path = work.free_path(parent, "net2deeper")
    work.gm.add_submodule(new_path, copy.deepcopy(work.gm.get_submodule(path)))
    graph = work.gm.graph
    env: dict[fx.Node, fx.Node] = {}
    start, _ = block.spine()

    def arg(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a is start:
            return block.output
        if a.op == "get_attr" and _moved(a.target, path, new_path) != a.target:  # the copy's own parameters
            with graph.inserting_before(block.nodes[0]):  # parameters have no inputs: before every user
                env[a] = graph.get_attr(str(_moved(a.target, path, new_path)))
            return env[a]
        return a

    last = block.output
    for node in block.nodes:
        with graph.inserting_after(last):
            target = _moved(node.target, path, new_path) if node.op in ("call_module", "get_attr") else node.target
            new = graph.create_node(node.op, target, fx.map_arg(node.args, arg), fx.map_arg(node.kwargs, arg))
        new.meta = {**node.meta, STACK: _moved_stack(node.meta.get(STACK), path, new_path)}
        env[node] = last = new
    block.output.replace_all_uses_with(env[block.output], delete_user_cb=lambda user: user not in env.values())
    for branch in branches:
        for kind, zeroed in _zero_points(work, env[branch]) or []:
            _zero(work.gm, zeroed, kind)
    return new_path


def _moved(target: fx.node.Target, old: str, new: str) -> fx.node.Target:
    text = str(target)
    return new + text[len(old) :] if text == old or text.startswith(old + ".") else target


def _moved_stack(stack: OrderedDict | None, old: str, new: str) -> OrderedDict:
    out: OrderedDict = OrderedDict()
    for key, value in (stack or {}).items():
        path = value[0] if isinstance(value, tuple) else key
        moved = str(_moved(path, old, new))
        out[str(_moved(key, old, new)) if key == path else key] = (
            (moved, value[1]) if isinstance(value, tuple) else value
        )
    return out


@torch.no_grad()
def _zero(gm: fx.GraphModule, targets: list[str], kind: str) -> None:
    for target in targets:
        if kind == "module":
            for p in gm.get_submodule(target).parameters():
                p.zero_()
        else:
            owner, _, name = target.rpartition(".")
            getattr(gm.get_submodule(owner) if owner else gm, name).zero_()
