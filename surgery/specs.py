"""What crosses a boundary: per-sample shapes (batch dimension dropped) and dtypes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ValueSpec:
    """The spec of one value crossing a boundary.

    ``shape`` is the per-sample shape of a tensor (its first, batch, dimension dropped);
    non-tensor values (sizes, ints) have ``shape=None`` and ``kind`` names their type.
    """

    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None

    @classmethod
    def of(cls, value: Any) -> ValueSpec:
        if isinstance(value, torch.Tensor):
            return cls("tensor", tuple(value.shape[1:]), str(value.dtype).removeprefix("torch."))
        return cls(type(value).__name__)

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


def specs_of(value: Any, arity: int) -> tuple[ValueSpec, ...]:
    """Specs of a boundary value that holds ``arity`` values (a tuple when arity > 1)."""
    values = value if arity > 1 else (value,)
    return tuple(ValueSpec.of(v) for v in values)


def format_specs(specs: tuple[ValueSpec, ...] | None) -> str:
    if specs is None:
        return "?"
    return ", ".join(map(str, specs))
