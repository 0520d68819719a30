"""Adapters that make the pieces of two networks fit, and stitching with them.

>>> import torch, torchvision, surgery
>>> x = torch.randn(1, 3, 64, 64)
>>> a = surgery.cut(torchvision.models.resnet18().eval(), "layer2", x)
>>> b = surgery.cut(torchvision.models.resnet50().eval(), "layer2", x)
>>> hybrid = surgery.stitch(a[0], b[1], x)          # 128 channels -> adapter -> 512
>>> [type(p).__name__ for p in hybrid]
['Piece', 'Adapter', 'Piece']
>>> hybrid(x).shape
torch.Size([1, 1000])
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from surgery.cut import Pieces, _as_args, piece_info
from surgery.errors import SurgeryError
from surgery._util import evaluating
from surgery.specs import ValueSpec

Shape = tuple[int, ...]
INITS = ("auto", "identity", "random", "matching")
KINDS = {"auto": (1, 2, 3), "conv": (3,), "linear": (1, 2)}  # kind -> per-sample ranks it maps


def _shape(spec: ValueSpec | Sequence[int]) -> Shape:
    if isinstance(spec, ValueSpec):
        if not spec.is_tensor or spec.shape is None:
            raise SurgeryError(f"an adapter maps tensors, not a {spec.kind}")
        return spec.shape
    return tuple(int(d) for d in spec)


class Adapter(nn.Module):
    """Maps one per-sample shape to another.

    (C, H, W) -> (C', H', W'): resize (average pooling down / bilinear up, on the
    smaller side of the 1x1 conv) + 1x1 conv (+ BatchNorm) (+ ReLU).
    (D,) or (T, D) -> (D',) or (T, D'): a linear map on the last dimension (+ ReLU).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], batchnorm: bool = False, relu: bool = True):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.batchnorm, self.relu = batchnorm, relu
        if len(self.in_shape) == 3 and len(self.out_shape) == 3:
            (c_in, *hw_in), (c_out, *hw_out) = self.in_shape, self.out_shape
            self.pre = nn.AdaptiveAvgPool2d(tuple(hw_out)) if hw_in[0] > hw_out[0] or hw_in[1] > hw_out[1] else nn.Identity()
            self.map = nn.Conv2d(c_in, c_out, 1, bias=not batchnorm)
            self.norm = nn.BatchNorm2d(c_out) if batchnorm else nn.Identity()
            grow = hw_in[0] < hw_out[0] or hw_in[1] < hw_out[1]
            self.post = nn.Upsample(size=tuple(hw_out), mode="bilinear", align_corners=False) if grow else nn.Identity()
        elif len(self.in_shape) == len(self.out_shape) and len(self.in_shape) in (1, 2) and self.in_shape[:-1] == self.out_shape[:-1]:
            self.pre = nn.Identity()
            self.map = nn.Linear(self.in_shape[-1], self.out_shape[-1], bias=not batchnorm)
            self.norm = nn.LayerNorm(self.out_shape[-1]) if batchnorm else nn.Identity()
            self.post = nn.Identity()
        else:
            raise SurgeryError(
                f"no adapter maps {'x'.join(map(str, self.in_shape))} to {'x'.join(map(str, self.out_shape))}: "
                "adapters map (C,H,W)->(C',H',W') or change only the last dimension of (D,)/(T,D); cut where the shapes are alike"
            )
        self.act = nn.ReLU() if relu else nn.Identity()

    @property
    def in_spec(self) -> ValueSpec:
        return ValueSpec("tensor", self.in_shape, "float32")

    @property
    def out_spec(self) -> ValueSpec:
        return ValueSpec("tensor", self.out_shape, "float32")

    def spec_kwargs(self) -> dict[str, Any]:
        return {"in_shape": self.in_shape, "out_shape": self.out_shape, "batchnorm": self.batchnorm, "relu": self.relu}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.act(self.norm(self.map(self.pre(x)))))

    @torch.no_grad()
    def init_from_assignment(self, assignment: Sequence[int] | torch.Tensor) -> Adapter:
        """Set the map to copy input channel ``assignment[j]`` to output ``j`` (``-1``: zero)."""
        w = self.map.weight
        a = torch.as_tensor(assignment, dtype=torch.long)
        if a.numel() != w.shape[0]:
            raise SurgeryError(f"assignment has {a.numel()} entries; the adapter has {w.shape[0]} outputs")
        if int(a.max()) >= w.shape[1]:
            raise SurgeryError(f"assignment names input channel {int(a.max())}; the adapter has {w.shape[1]} inputs")
        w.zero_()
        rows = torch.nonzero(a >= 0).flatten()
        w.view(w.shape[0], w.shape[1])[rows, a[rows]] = 1.0
        if self.map.bias is not None:
            self.map.bias.zero_()
        return self


def adapter(
    in_spec: ValueSpec | Sequence[int],
    out_spec: ValueSpec | Sequence[int],
    kind: str = "auto",
    *,
    batchnorm: bool = False,
    relu: bool | None = None,
    init: str = "auto",
    assignment: Sequence[int] | torch.Tensor | None = None,
) -> Adapter:
    """An :class:`Adapter` from per-sample shape ``in_spec`` to ``out_spec``.

    Args:
        kind: ``"conv"`` (1x1 conv, for (C,H,W) boundaries), ``"linear"`` (for (D,) or
            (T,D) boundaries) or ``"auto"`` (by the shapes).
        batchnorm: add BatchNorm (LayerNorm for token/vector boundaries) after the map.
        relu: ReLU after the map; default on for (C,H,W) boundaries, off for linear ones.
        init: ``"identity"`` (channel j copies channel j, the rest zero), ``"random"``
            (PyTorch's default), ``"matching"`` (from ``assignment``, e.g.
            :func:`surgery.match_channels`), or ``"auto"``: identity when the channel
            counts agree, random otherwise.
    """
    if init not in INITS:
        raise SurgeryError(f"unknown adapter init '{init}'; choose one of {', '.join(INITS)}")
    if kind not in KINDS:
        raise SurgeryError(f"unknown adapter kind '{kind}'; choose one of {', '.join(KINDS)}")
    a_in, a_out = _shape(in_spec), _shape(out_spec)
    if len(a_in) not in KINDS[kind]:
        raise SurgeryError(f"a {kind} adapter maps {' or '.join(f'{r}-d' for r in KINDS[kind])} per-sample shapes, not {'x'.join(map(str, a_in))}")
    ad = Adapter(a_in, a_out, batchnorm=batchnorm, relu=(len(a_in) == 3) if relu is None else relu)
    if init == "matching":
        if assignment is None:
            raise SurgeryError("init='matching' needs assignment= (e.g. from surgery.match_channels)")
        ad.init_from_assignment(assignment)
    elif init == "identity" or (init == "auto" and a_in[0 if len(a_in) == 3 else -1] == a_out[0 if len(a_out) == 3 else -1]):
        n_in, n_out = ad.map.weight.shape[:2]
        ad.init_from_assignment([j if j < n_in else -1 for j in range(n_out)])
    return ad


def _flatten(part: nn.Module) -> list[nn.Module]:
    return list(part) if isinstance(part, Pieces) else [part]


def _output_of(modules: list[nn.Module], example: tuple[Any, ...]) -> Any:
    pieces = Pieces(modules)
    with evaluating(pieces):
        return pieces(*example)


def stitch(
    up: nn.Module,
    down: nn.Module,
    example_input: Any,
    *,
    allow_adapter: bool = True,
    batchnorm: bool = False,
    relu: bool | None = None,
    init: str = "auto",
) -> Pieces:
    """``up`` -> adapter (only where the boundary specs differ) -> ``down``, as a :class:`Pieces`.

    ``up`` must hand over one tensor and ``down`` take one; ``down``'s expected input
    comes from the shapes recorded when it was cut (``surgery.cut(..., example_input=x)``).
    """
    ups, downs = _flatten(up), _flatten(down)
    last_up, first_down = piece_info(ups[-1]), piece_info(downs[0])
    if last_up.out_arity != 1 or first_down.in_arity != 1:
        raise SurgeryError(
            f"stitching needs a single-tensor boundary, but the up piece hands over {last_up.out_arity} values "
            f"and the down piece takes {first_down.in_arity} (a cut inside a block?); cut at a stage output such as 'layer2'"
        )
    if first_down.in_specs is None:
        raise SurgeryError("the down piece has no recorded input shape; cut it with example_input=... (or load it from a saved directory)")
    value = _output_of(ups, _as_args(example_input))
    if not isinstance(value, torch.Tensor):
        raise SurgeryError(f"the up piece returns a {type(value).__name__}, not a tensor; stitch at a tensor boundary")
    have, want = ValueSpec.of(value), first_down.in_specs[0]
    if have.shape == want.shape:
        return Pieces([*ups, *downs])
    if not allow_adapter:
        raise SurgeryError(f"the up piece gives {have} but the down piece expects {want}; allow an adapter or cut where the shapes agree")
    ad = adapter(have, want, batchnorm=batchnorm, relu=relu, init=init).to(value.device)
    return Pieces([*ups, ad, *downs])
