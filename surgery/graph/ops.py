"""One table of graph ops: each op's torch.fx function, tensor-method and aten forms, written once.

An fx graph records ``torch.relu``, ``F.relu`` or ``x.relu()``, a graph captured by
torch.export records ``aten.relu.default``: the same op under three *kinds* of target.
:data:`OPS` lists each op once with all its forms; the channel rules
(:mod:`surgery.channels.rules`), the sign analysis (:mod:`growth.signs`) and the
residual-block analysis (:mod:`growth.block`) select their ops from it with
:func:`targets` instead of writing their own lists.

>>> import operator, torch
>>> from surgery.graph.ops import OPS, targets
>>> OPS.get("add").methods
('add',)
>>> sorted(map(str, targets("add", kinds=("aten",))))
['aten.add.Tensor']
>>> operator.iadd in targets("add_"), "add_" in targets("add_", kinds=("function",))
(True, False)
>>> targets("addd")
Traceback (most recent call last):
...
surgery.core.errors.SurgeryError: unknown graph op 'addd' (closest: add, add_, addmm); choose one of relu, ...

The names are the ops', not their forms': ``add_`` is the in-place op (``x += y``, ``x.add_(y)``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torchvision.ops import stochastic_depth

from surgery.core.registry import Registry

aten = torch.ops.aten
KINDS = ("function", "method", "aten")  # call_function targets, call_method names, aten overloads


@dataclass(frozen=True)
class GraphOp:
    """One op's forms: the torch/functional/operator callables, tensor-method names and aten overloads."""

    name: str
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[Any, ...] = ()

    def forms(self, kinds: Collection[str] = KINDS) -> tuple[Any, ...]:
        """The targets of the given kinds (``"function"``, ``"method"``, ``"aten"``)."""
        return (
            (self.functions if "function" in kinds else ())
            + (self.methods if "method" in kinds else ())
            + (self.aten if "aten" in kinds else ())
        )


OPS: Registry[GraphOp] = Registry("graph op")


def _op(name: str, functions: tuple[Any, ...] = (), methods: tuple[str, ...] = (), aten: tuple[Any, ...] = ()) -> None:
    OPS.register(name, GraphOp(name, functions, methods, aten))


# activations and other unary elementwise ops
_op("relu", (torch.relu, F.relu), ("relu",), (aten.relu.default,))
_op("relu_", (torch.relu_, F.relu_), ("relu_",))
_op("relu6", (F.relu6,))
_op("leaky_relu", (F.leaky_relu,), (), (aten.leaky_relu.default,))
_op("gelu", (F.gelu,), (), (aten.gelu.default,))
_op("silu", (F.silu,), (), (aten.silu.default,))
_op("hardswish", (F.hardswish,), (), (aten.hardswish.default,))
_op("hardsigmoid", (F.hardsigmoid,), (), (aten.hardsigmoid.default,))
_op("sigmoid", (torch.sigmoid, F.sigmoid), ("sigmoid",), (aten.sigmoid.default,))
_op("sigmoid_", (), ("sigmoid_",))
_op("tanh", (torch.tanh, F.tanh), ("tanh",), (aten.tanh.default,))
_op("elu", (F.elu,))
_op("selu", (F.selu,))
_op("mish", (F.mish,))
_op("softplus", (F.softplus,))
_op("hardtanh", (F.hardtanh,))
_op("erf", (), (), (aten.erf.default,))
_op("pow", (), (), (aten.pow.Tensor_Scalar,))
_op("neg", (operator.neg, torch.neg), ("neg",), (aten.neg.default,))
_op("abs", (torch.abs,), ("abs",), (aten.abs.default,))
_op("dropout", (F.dropout,))
_op("dropout2d", (F.dropout2d,))
_op("stochastic_depth", (stochastic_depth,))
_op("softmax", (F.softmax, torch.softmax), ("softmax",), (aten.softmax.int, aten._softmax.default))
# casts, copies and aliases
_op("to", (), ("to",), (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default))
_op("to_device", (), (), (aten.to.device,))
_op("float", (), ("float",))
_op("double", (), ("double",))
_op("type_as", (), ("type_as",))
_op("alias", (), (), (aten.alias.default,))
_op("clone", (), ("clone",), (aten.clone.default,))
_op("contiguous", (), ("contiguous",), (aten.contiguous.default,))
_op("detach", (), ("detach",))
# arithmetic (the in-place forms are ops of their own)
_op("add", (operator.add, torch.add), ("add",), (aten.add.Tensor,))
_op("add_", (operator.iadd,), ("add_",), (aten.add_.Tensor,))
_op("sub", (operator.sub, torch.sub), ("sub",), (aten.sub.Tensor,))
_op("sub_", (operator.isub,), ("sub_",))
_op("mul", (operator.mul, torch.mul), ("mul",), (aten.mul.Tensor,))
_op("mul_", (operator.imul,), ("mul_",), (aten.mul_.Tensor,))
_op("div", (operator.truediv, torch.div), ("div",), (aten.div.Tensor,))
_op("div_", (operator.itruediv,), ("div_",))
# shapes, selection and joins
_op("view", (), ("view",), (aten.view.default, aten._unsafe_view.default))
_op("reshape", (torch.reshape,), ("reshape",), (aten.reshape.default,))
_op("flatten", (torch.flatten,), ("flatten",), (aten.flatten.using_ints,))
_op("unflatten", (), ("unflatten",))
_op("permute", (torch.permute,), ("permute",), (aten.permute.default,))
_op("transpose", (torch.transpose,), ("transpose",), (aten.transpose.int,))
_op("swapaxes", (torch.swapaxes,), ("swapaxes",))
_op("swapdims", (torch.swapdims,), ("swapdims",))
_op("unsqueeze", (torch.unsqueeze,), ("unsqueeze",), (aten.unsqueeze.default,))
_op("getitem", (operator.getitem,))
_op("cat", (torch.cat, torch.concat), (), (aten.cat.default,))
_op("concatenate", (torch.concatenate,))
_op("split", (torch.split,), ("split",), (aten.split.Tensor, aten.split_with_sizes.default))
_op("chunk", (torch.chunk,), ("chunk",))
# reductions and pooling
_op("mean", (torch.mean,), ("mean",), (aten.mean.dim,))
_op("sum", (torch.sum,), ("sum",), (aten.sum.dim_IntList,))
_op("amax", (torch.amax,), ("amax",), (aten.amax.default,))
_op("amin", (torch.amin,), ("amin",), (aten.amin.default,))
_op("max_pool2d", (F.max_pool2d,), (), (aten.max_pool2d.default,))
_op("avg_pool2d", (F.avg_pool2d,), (), (aten.avg_pool2d.default,))
_op("adaptive_avg_pool2d", (F.adaptive_avg_pool2d,), (), (aten.adaptive_avg_pool2d.default,))
_op("adaptive_max_pool2d", (F.adaptive_max_pool2d,))
_op("interpolate", (F.interpolate,))
# layers called as functions
_op("linear", (F.linear,), (), (aten.linear.default,))
_op("conv2d", (F.conv2d,), (), (aten.conv2d.default,))
_op("addmm", (), (), (aten.addmm.default,))


def targets(*names: str, kinds: Collection[str] = KINDS) -> frozenset[Any]:
    """The targets of the ops ``names`` of the given kinds: what an fx node's ``target`` is when it calls one.

    Method forms are strings, function and aten forms are callables, so a set mixing them is
    matched against a ``call_function`` or ``call_method`` node's target alike.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise OPS.error(f"unknown kind of graph op target {sorted(unknown)}; choose among {', '.join(KINDS)}")
    return frozenset(form for name in names for form in OPS.get(name).forms(kinds))


def is_call(node: fx.Node, table: Collection[Any]) -> bool:
    """True when fx node ``node`` calls one of ``table``'s targets (a function, aten op or tensor method)."""
    return node.op in ("call_function", "call_method") and node.target in table
