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
import torch.nn.functional as F
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.core.specs import ValueSpec, known_specs
from surgery.core.util import evaluating
from surgery.graph.inputs import Example
from surgery.pieces.cut import Pieces, piece_info

Shape = tuple[int, ...]
INITS = ("auto", "identity", "random", "matching", "lstsq")


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

    At a boundary that carries ``side_values`` more values after the main one (masks,
    position tables, sizes), those pass through unchanged: ``forward(x, *side)``
    returns ``(map(x), *side)``.

    >>> import torch, surgery
    >>> a = surgery.Adapter((64, 8, 8), (128, 4, 4))
    >>> tuple(a(torch.randn(2, 64, 8, 8)).shape)
    (2, 128, 4, 4)
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        batchnorm: bool = False,
        relu: bool = True,
        side_values: int = 0,
    ):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.batchnorm, self.relu, self.side_values = batchnorm, relu, int(side_values)
        self.map: nn.Conv2d | nn.Linear
        self.norm: nn.Module
        if len(self.in_shape) == 3 and len(self.out_shape) == 3:
            (c_in, *hw_in), (c_out, *hw_out) = self.in_shape, self.out_shape
            self.pre = (
                nn.AdaptiveAvgPool2d(tuple(hw_out)) if hw_in[0] > hw_out[0] or hw_in[1] > hw_out[1] else nn.Identity()
            )
            self.map = nn.Conv2d(c_in, c_out, 1, bias=not batchnorm)
            self.norm = nn.BatchNorm2d(c_out) if batchnorm else nn.Identity()
            grow = hw_in[0] < hw_out[0] or hw_in[1] < hw_out[1]
            self.post = nn.Upsample(size=tuple(hw_out), mode="bilinear", align_corners=False) if grow else nn.Identity()
        elif (
            len(self.in_shape) == len(self.out_shape)
            and len(self.in_shape) in (1, 2)
            and self.in_shape[:-1] == self.out_shape[:-1]
        ):
            self.pre = nn.Identity()
            self.map = nn.Linear(self.in_shape[-1], self.out_shape[-1], bias=not batchnorm)
            self.norm = nn.LayerNorm(self.out_shape[-1]) if batchnorm else nn.Identity()
            self.post = nn.Identity()
        else:
            raise SurgeryError(
                f"no adapter maps {'x'.join(map(str, self.in_shape))} to {'x'.join(map(str, self.out_shape))}: "
                "adapters map (C,H,W)->(C',H',W') or change only the last dimension of (D,)/(T,D); "
                "cut where the shapes are alike"
            )
        self.act = nn.ReLU() if relu else nn.Identity()

    @property
    def in_spec(self) -> ValueSpec:
        return ValueSpec("tensor", self.in_shape, "float32")

    @property
    def out_spec(self) -> ValueSpec:
        return ValueSpec("tensor", self.out_shape, "float32")

    def spec_kwargs(self) -> dict[str, Any]:
        return {
            "in_shape": self.in_shape,
            "out_shape": self.out_shape,
            "batchnorm": self.batchnorm,
            "relu": self.relu,
            "side_values": self.side_values,
        }

    @property
    def boundary_names(self) -> tuple[str, ...]:
        return ("input", *(f"side{i}" for i in range(1, self.side_values + 1)))

    def forward(self, x: torch.Tensor, *side: Any) -> Any:
        y = self.post(self.act(self.norm(self.map(self.pre(x)))))
        return (y, *side) if self.side_values else y

    @torch.no_grad()
    def init_least_squares(self, inputs: torch.Tensor, targets: torch.Tensor) -> Adapter:
        """Fit the map (and bias) by least squares so that ``map(pre(inputs))`` is closest to ``targets``.

        SN-Net's initialisation of stitching layers: ``torch.linalg.lstsq`` on every
        position's features (pixels of (C,H,W) values, tokens of (T,D) values, samples of
        (D,) values); targets are pooled to the map's resolution where it resizes.
        """
        x = self.pre(inputs)
        if x.dim() == 4:
            y = targets if targets.shape[-2:] == x.shape[-2:] else F.adaptive_avg_pool2d(targets, x.shape[-2:])
            rows, cols = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        else:
            rows, cols = x.reshape(-1, x.shape[-1]), targets.reshape(-1, targets.shape[-1])
        bias = self.map.bias is not None
        design = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1) if bias else rows
        solution = torch.linalg.lstsq(design, cols).solution
        weight = solution[: rows.shape[1]].T
        self.map.weight.copy_(weight.reshape(self.map.weight.shape))
        if self.map.bias is not None:
            self.map.bias.copy_(solution[-1])
        return self

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
    *,
    batchnorm: bool = False,
    relu: bool | None = None,
    init: str = "auto",
    assignment: Sequence[int] | torch.Tensor | None = None,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
    side_values: int = 0,
) -> Adapter:
    """An :class:`Adapter` from per-sample shape ``in_spec`` to ``out_spec``.

    The shapes pick the map: a 1x1 conv for (C,H,W) boundaries, a linear map on the last
    dimension for (D,) and (T,D) boundaries.

    Args:
        batchnorm: add BatchNorm (LayerNorm for token/vector boundaries) after the map.
        relu: ReLU after the map; default on for (C,H,W) boundaries (off with
            ``init="lstsq"``), off for linear ones.
        init: ``"identity"`` (channel j copies channel j, the rest zero), ``"random"``
            (PyTorch's default), ``"matching"`` (from ``assignment``, e.g.
            :func:`surgery.match_channels`), ``"lstsq"`` (least squares from
            ``features=(inputs, targets)``, SN-Net's), or ``"auto"``: identity when the
            channel counts agree, random otherwise.
        side_values: values after the main one that the boundary also carries (passed through).

    >>> import torch, surgery
    >>> spec = surgery.ValueSpec("tensor", (64, 8, 8))
    >>> a = surgery.adapter(spec, spec, relu=False)
    >>> x = torch.randn(2, 64, 8, 8)
    >>> torch.equal(a(x), x)  # same channel counts: initialised as the identity
    True
    """
    if init not in INITS:
        raise SurgeryError(f"unknown adapter init '{init}'; choose one of {', '.join(INITS)}")
    a_in, a_out = _shape(in_spec), _shape(out_spec)
    if relu is None:
        relu = len(a_in) == 3 and init != "lstsq"
    ad = Adapter(a_in, a_out, batchnorm=batchnorm, relu=relu, side_values=side_values)
    if init == "lstsq":
        if features is None:
            raise SurgeryError(
                "init='lstsq' needs features=(inputs, targets): the two networks' values at the boundary"
            )
        ad.init_least_squares(*features)
    elif init == "matching":
        if assignment is None:
            raise SurgeryError("init='matching' needs assignment= (e.g. from surgery.match_channels)")
        ad.init_from_assignment(assignment)
    elif init == "identity" or (
        init == "auto" and a_in[0 if len(a_in) == 3 else -1] == a_out[0 if len(a_out) == 3 else -1]
    ):
        n_in, n_out = ad.map.weight.shape[:2]
        ad.init_from_assignment([j if j < n_in else -1 for j in range(n_out)])
    return ad


def _flatten(part: nn.Module) -> list[nn.Module]:
    return list(part) if isinstance(part, Pieces) else [part]


def _output_of(modules: list[nn.Module], example: Example) -> Any:
    pieces = Pieces(modules)
    with evaluating(pieces):
        return example(pieces)


def boundary_adapter(
    have: Sequence[ValueSpec],
    want: Sequence[ValueSpec],
    names: Sequence[str] = (),
    *,
    always: bool = False,
    **options: Any,
) -> Adapter | None:
    """The adapter from a boundary giving values ``have`` to one expecting ``want`` (None if nothing to map).

    The first value is the one an adapter maps; the others (masks, position tables,
    sizes) must already agree, value by value, or a one-line error names the first
    that does not. ``always``: an adapter even where the main shapes agree.
    """
    if len(have) != len(want):
        raise SurgeryError(
            f"the up piece hands over {len(have)} values but the down piece takes {len(want)}; "
            "cut both networks at the same kind of point (a stage or block output)"
        )
    for k in range(1, len(want)):
        if (have[k].kind, have[k].shape, have[k].dtype) != (want[k].kind, want[k].shape, want[k].dtype):
            name = names[k] if k < len(names) else f"#{k}"
            raise SurgeryError(
                f"the down piece needs side value '{name}' as {want[k]} ({want[k].dtype}) but the up piece gives "
                f"{have[k]} ({have[k].dtype}); these networks do not share it at this cut"
            )
    if have[0].shape == want[0].shape and not always:
        return None
    return adapter(have[0], want[0], side_values=len(want) - 1, **options)


def stitch(
    up: nn.Module,
    down: nn.Module,
    example_input: Any,
    *,
    allow_adapter: bool = True,
    batchnorm: bool = False,
    relu: bool | None = None,
    init: str = "auto",
    reference: nn.Module | None = None,
) -> Pieces:
    """``up`` -> adapter (only where the boundary specs differ) -> ``down``, as a :class:`Pieces`.

    ``down``'s expected inputs come from the specs recorded when it was cut
    (``surgery.cut(..., example_input=x)``). A boundary may carry several values (a cut
    inside a block, hidden states with a mask): the first is mapped by the adapter, the
    others must agree between the two networks.

    Args:
        example_input: what ``up`` is called with (a tensor, tuple, dict or Example).
        init: see :func:`adapter`; ``"lstsq"`` fits the adapter by least squares to
            ``reference``'s output on ``example_input``.
        reference: the pieces of ``down``'s own network that come before ``down`` (for
            ``init="lstsq"``): the features the adapter should reproduce.

    >>> import torch, torchvision, surgery
    >>> x = torch.randn(2, 3, 32, 32)
    >>> a, b = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    >>> up, down = surgery.cut(a.eval(), "layer2", x)[0], surgery.cut(b.eval(), "layer2", x)[1]  # two networks
    >>> hybrid = surgery.stitch(up, down, x)  # the same shape at layer2: joined as they are
    >>> len(hybrid), torch.equal(hybrid(x), down(up(x)))
    (2, True)
    """
    ups, downs = _flatten(up), _flatten(down)
    last_up, first_down = piece_info(ups[-1]), piece_info(downs[0])
    want = known_specs(first_down.in_specs)
    if want is None:
        raise SurgeryError(
            "the down piece has no recorded input shape; cut it with example_input=... (or load it "
            "from a saved directory)"
        )
    example = Example.required(example_input, "stitch")
    value = _output_of(ups, example)
    values = value if last_up.out_arity > 1 else (value,)
    if not isinstance(values[0], torch.Tensor):
        raise SurgeryError(
            f"the up piece returns a {type(values[0]).__name__}, not a tensor; stitch at a tensor boundary"
        )
    have = tuple(ValueSpec.of(v) for v in values)
    features = None
    if init == "lstsq":
        if reference is None:
            raise SurgeryError("init='lstsq' needs reference=: the pieces before the down piece in its own network")
        target = _output_of(_flatten(reference), example)
        features = (values[0], target[0] if isinstance(target, tuple) else target)
    options: dict[str, Any] = {"batchnorm": batchnorm, "relu": relu, "init": init, "features": features}
    ad = boundary_adapter(have, want, first_down.in_names, **options)
    if ad is None:
        return Pieces([*ups, *downs])
    if not allow_adapter:
        raise SurgeryError(
            f"the up piece gives {have[0]} but the down piece expects {want[0]}; "
            "allow an adapter or cut where the shapes agree"
        )
    return Pieces([*ups, ad.to(values[0].device), *downs])
