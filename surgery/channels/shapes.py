"""Shape inference for the channel analysis: a meta-device run gives every node's output shape.

:func:`infer_shapes` runs a traced graph on meta tensors (shapes only, no arithmetic,
parameters never copied), trying the inputs :mod:`surgery.graph.inputs` guesses when no example is given, and
returns a :class:`Shapes`; :func:`describe_node` names a node the way error messages do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call
from torchvision.ops import StochasticDepth

from surgery.core.errors import SurgeryError
from surgery.core.util import evaluating, first_line
from surgery.graph.inputs import Example, candidate_examples, model_dtype

# modules that act on each value alone: the channels pass through them unchanged
ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    StochasticDepth,
)
_SHAPE_KEEPING_MODULES: tuple[type, ...] = (
    *ELEMENTWISE_MODULES,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)


@dataclass(frozen=True)
class Shapes:
    """Output shape of every tensor-valued node (others map to None), the model's dtype, and the input that ran.

    ``example`` holds real tensors (the given example, or seeded random images of the
    first size that ran), so checks can run the model on the same input.
    """

    example: Example
    dtype: torch.dtype
    of: dict[str, tuple[int, ...] | None]

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.shape) for t in self.example.tensors())


class _MetaRun(fx.Interpreter):
    """Runs a graph on meta tensors: every shape, no arithmetic, parameters never copied.

    ``real=True`` runs it on real tensors instead (for graphs with ops that read values,
    such as torch.export's shape guards).
    """

    def __init__(self, gm: fx.GraphModule, real: bool = False):
        super().__init__(gm)
        self.real = real
        self.shapes: dict[str, tuple[int, ...] | None] = {}

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, _SHAPE_KEEPING_MODULES) and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if self.real:
            return module(*args, **kwargs)
        state = {k: v.to("meta") for k, v in module.state_dict(keep_vars=True).items()}
        return functional_call(module, state, args, kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) and not self.real else value

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n.name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def _first_layer(gm: fx.GraphModule) -> nn.Module | None:
    """The layer the first input goes to first (its channels or features set the input's), if a module."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next((u for p in placeholders[:1] for u in p.users if u.op == "call_module"), None)
    return gm.get_submodule(str(first.target)) if first is not None else None


def _meta(value: Any, dtype: torch.dtype) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty(value.shape, dtype=dtype if value.is_floating_point() else value.dtype, device="meta")


@torch.no_grad()
def infer_shapes(gm: fx.GraphModule, example_input: Any = None) -> Shapes:
    """Shapes of every node from a meta-device run on ``example_input`` (shapes only are used).

    Without an example, tries :func:`surgery.graph.inputs.candidate_examples` (the model's
    declared input, else 2x3xSxS images for S in 64, 32, 96, 224, 299, or a 2xF vector
    for a Linear first layer) and keeps the first that runs; growth passes the declared
    input of the model it traced (:class:`growth.graphedit.Workbench`).
    """
    dtype = model_dtype(gm)
    given = Example.of(example_input)
    candidates = [given] if given is not None else candidate_examples(gm, _first_layer(gm))
    failure = ""
    for example in candidates:
        for real in (False, True):  # meta tensors first; real ones where an op reads values
            run = _MetaRun(gm, real)
            values = example.flat(gm.graph) if real else [_meta(v, dtype) for v in example.flat(gm.graph)]
            try:
                with evaluating(gm):
                    run.run(*values, enable_io_processing=False)
            except Exception as e:  # noqa: BLE001 - any failure means "not this input"
                failure = first_line(e)
                continue
            return Shapes(example, dtype, run.shapes)
    tried = "; ".join(example.describe() for example in candidates)
    raise SurgeryError(
        f"cannot run {type(gm).__name__} on an input of shape {tried} ({failure}); "
        "pass example_input= an input the model accepts"
    )


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """``'layer1.0.bn2' (BatchNorm2d)``, ``'add_3' (add)``, ``'cat'``: a node as error messages name it."""
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(str(node.target))).__name__})"
    what = f".{node.target}()" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}'" if node.name.rstrip("_0123456789") == what else f"'{node.name}' ({what})"
