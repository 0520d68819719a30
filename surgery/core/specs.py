"""What crosses a boundary: per-sample shapes (batch dimension dropped) and dtypes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx


@dataclass(frozen=True)
class ValueSpec:
    """The spec of one value crossing a boundary.

    ``shape`` is the per-sample shape of a tensor (its first, batch, dimension dropped);
    non-tensor values (sizes, ints) have ``shape=None`` and ``kind`` names their type.

    >>> import torch, surgery
    >>> surgery.ValueSpec.of(torch.zeros(8, 3, 32, 32))
    ValueSpec(kind='tensor', shape=(3, 32, 32), dtype='float32')
    >>> surgery.ValueSpec.of(7)
    ValueSpec(kind='int', shape=None, dtype=None)
    """

    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None

    @classmethod
    def of(cls, value: Any) -> ValueSpec:
        if isinstance(value, torch.Tensor):
            return cls("tensor", tuple(value.shape[1:]), str(value.dtype).removeprefix("torch."))
        return cls(type(value).__name__)

    @classmethod
    def of_meta(cls, val: Any) -> ValueSpec | None:
        """The spec of a value a graph recorded (torch.export's ``meta['val']``: fake tensors, SymInts), if known.

        Symbolic sizes read as the sizes of the input the graph was captured on.

        >>> ValueSpec.of_meta(torch.empty(2, 3, 4, device="meta"))
        ValueSpec(kind='tensor', shape=(3, 4), dtype='float32')
        >>> ValueSpec.of_meta(object()) is None
        True
        """
        if isinstance(val, torch.Tensor):
            shape = tuple(_hint(d) for d in val.shape[1:])
            if any(d is None for d in shape):
                return None
            return cls("tensor", shape, str(val.dtype).removeprefix("torch."))  # type: ignore[arg-type]
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return cls(type(val).__name__.removeprefix("Sym").lower())
        if val is None or isinstance(val, (bool, int, float, str)):
            return cls.of(val)
        return None

    @property
    def is_tensor(self) -> bool:
        return self.kind == "tensor"

    def __str__(self) -> str:
        if not self.is_tensor:
            return self.kind
        return "x".join(map(str, self.shape)) if self.shape else "scalar"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape) if self.shape is not None else None, "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ValueSpec:
        shape = d.get("shape")
        return cls(d["kind"], tuple(shape) if shape is not None else None, d.get("dtype"))


def _hint(size: Any) -> int | None:
    """A (symbolic) size as the int it had on the captured input (None when it has no such value)."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else None
    return int(size)


def specs_of(value: Any, arity: int) -> tuple[ValueSpec, ...]:
    """Specs of a boundary value that holds ``arity`` values (a tuple when arity > 1)."""
    values = value if arity > 1 else (value,)
    return tuple(ValueSpec.of(v) for v in values)


def format_specs(specs: Sequence[ValueSpec | None] | None) -> str:
    if specs is None:
        return "?"
    return ", ".join(map(str, specs))


def known_specs(specs: Sequence[ValueSpec | None] | None) -> tuple[ValueSpec, ...] | None:
    """``specs`` when every value's spec is known; None otherwise (an adapter's side values have none)."""
    if specs is None or any(s is None for s in specs):
        return None
    return tuple(s for s in specs if s is not None)


def _recorded(node: Any) -> ValueSpec | None:
    """The spec of what ``node`` (an fx node, or a constant in its place) holds, from its recorded value."""
    if not isinstance(node, fx.Node):
        return ValueSpec.of(node)
    return ValueSpec.of_meta(node.meta["val"]) if "val" in node.meta else None


def graph_specs(graph: fx.Graph, out_arity: int) -> tuple[tuple[ValueSpec, ...], tuple[ValueSpec, ...]] | None:
    """A piece's input and output specs from the values its graph's nodes recorded (None where one is missing).

    Output specs: one per value a piece returns (``out_arity`` of them); the model's own
    output structure (a ``ModelOutput``, say) is one value named by its type.
    """
    nodes = list(graph.nodes)
    ins = [_recorded(n) for n in nodes if n.op == "placeholder"]
    tree = getattr(getattr(graph._codegen, "pytree_info", None), "out_spec", None)
    if tree is not None and not tree.is_leaf():
        outs: list[ValueSpec | None] = [ValueSpec(tree.type.__name__)]
    else:
        returned = nodes[-1].args[0]
        outs = [_recorded(v) for v in (returned if isinstance(returned, (tuple, list)) else [returned])]
    specs = [s for s in (*ins, *outs) if s is not None]
    if len(specs) < len(ins) + len(outs) or len(outs) != out_arity:
        return None
    return tuple(specs[: len(ins)]), tuple(specs[len(ins) :])
