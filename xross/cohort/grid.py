"""A cohort: K networks cut into the same number P of parts, with adapters between them.

A *path* picks a network for each part: ``(0, 1)`` runs net 0's first part, an
adapter, then net 1's second part. There are K**P paths; ``(i,) * P`` is net i itself.

>>> import torch
>>> from xross.cohort.grid import Cohort
>>> cohort = Cohort.build(["resnet18", "resnet50"], cuts=["layer2"], num_classes=10, image_size=32)
>>> cohort.num_nets, cohort.num_parts, len(cohort.paths())
(2, 2, 4)
>>> sorted(cohort.adapters)                       # 128 <-> 512 channels after layer2
['b0_0to1', 'b0_1to0']
>>> out = cohort.forward_paths(torch.randn(2, 3, 32, 32), cohort.paths())
>>> out[(0, 1)].shape
torch.Size([2, 10])

Computation is shared: each distinct path prefix (a part's output after a given
sequence of parts) is computed once per call and reused by every path that shares it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn

import surgery
from surgery.core.errors import SurgeryError
from surgery.core.specs import ValueSpec, known_specs
from surgery.pieces.adapters import boundary_adapter
from surgery.pieces.cut import piece_info
from xross.cohort.exits import ExitHeads, head_factory
from xross.cohort.lm import TextNets, check_lm, resolve_cuts, token_example
from xross.cohort.logits import as_logits
from xross.errors import XrossError

Route = tuple[int, ...]
"""A route through the cohort grid: the net each part is taken from, ``(0, 1, 1)`` = part 0 of net 0, then net 1's."""


def build_net(
    source: str | nn.Module, num_classes: int | None, stem: str = "imagenet", *, trust_code: bool = False
) -> nn.Module:
    """A network by reference (:mod:`surgery.files.refs`: a name, ``timm:NAME(img_size=32)``, a saved directory, ...)
    or as given, with an optional CIFAR stem for ResNet-style nets.

    ``stem="cifar"`` replaces ``conv1`` by a 3x3 stride-1 conv and ``maxpool`` by Identity
    (via :func:`surgery.replace`, so the change is part of the recipe).
    """
    if isinstance(source, str):
        net = surgery.refs.load(source, trust_code=trust_code, trust_typed=trust_code, num_classes=num_classes)
    else:
        net = source
    if stem == "imagenet":
        return net
    if stem != "cifar":
        raise XrossError(f"unknown stem '{stem}'; choose imagenet or cifar")
    conv = getattr(net, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(net, "maxpool"):
        raise XrossError(
            f"the cifar stem needs a ResNet-style net with conv1 and maxpool; {type(net).__name__} has not"
        )
    net = surgery.replace(net, "conv1", nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False))
    return surgery.replace(net, "maxpool", nn.Identity())


def _recorded(specs: Sequence[ValueSpec | None] | None) -> tuple[ValueSpec, ...]:
    """The specs of a boundary of a net cut on an example (recorded there by construction)."""
    known = known_specs(specs)
    assert known is not None, "a net cut on an example records the specs of its boundaries"
    return known


def _out_shape(piece: nn.Module) -> tuple[int, ...]:
    """The shape of the tensor a piece of a net cut on an example hands on (recorded there by construction)."""
    shape = _recorded(piece_info(piece).out_specs)[0].shape
    assert shape is not None, "a cut boundary is a tensor"
    return shape


def normalise_cuts(cuts: Sequence[str] | Sequence[Sequence[str]], num_nets: int) -> list[list[str]]:
    """Per-net cut lists from shared names (``["layer2"]``) or per-net lists (``[["layer2"], ["features.4"]]``)."""
    if not cuts:
        raise XrossError("give at least one cut (e.g. layer2): a cohort needs P >= 2 parts")
    if all(isinstance(c, str) for c in cuts):
        return [list(cuts) for _ in range(num_nets)]  # type: ignore[arg-type]
    per_net = [list(c) for c in cuts]  # type: ignore[arg-type]
    if len(per_net) != num_nets:
        raise XrossError(f"cuts are given for {len(per_net)} networks but the cohort has {num_nets}")
    counts = {len(c) for c in per_net}
    if len(counts) != 1:
        raise XrossError(f"every network needs the same number of cuts; got {[len(c) for c in per_net]}")
    return per_net


class Cohort(nn.Module):
    """K networks as :class:`surgery.Pieces` of P parts each, plus adapters between parts."""

    def __init__(
        self,
        nets: Sequence[surgery.Pieces],
        adapters: dict[str, nn.Module],
        names: Sequence[str],
        exits: ExitHeads | None = None,
        wholes: Sequence[nn.Module] | None = None,
    ):
        super().__init__()
        parts = {len(n) for n in nets}
        if not nets or len(parts) != 1 or parts.pop() < 2:
            raise XrossError("a cohort needs at least one network, every one cut into the same number P >= 2 of parts")
        self.nets = nn.ModuleList(nets)
        self.adapters = nn.ModuleDict(adapters)
        self.names = list(names)
        self.exits = exits
        # each net whole, sharing its modules with its pieces (not a submodule: saved once, as the pieces);
        # what growth during training grows (xross.cohort.grow)
        self.wholes: list[nn.Module | None] = list(wholes) if wholes is not None else [None] * len(nets)
        # (boundary, src, dst) -> why no adapter maps it: no path crosses there
        self.unstitched: dict[tuple[int, int, int], str] = {}
        self.text: TextNets | None = None  # set for causal LMs: what they read is token ids

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        nets: Sequence[str | nn.Module],
        cuts: Sequence[str] | Sequence[Sequence[str]],
        num_classes: int | None,
        image_size: int = 32,
        *,
        text: TextNets | None = None,
        require_stitches: bool = True,
        stem: str = "imagenet",
        adapter_batchnorm: bool = False,
        adapter_relu: bool = True,
        always_adapt: bool = False,
        transform_net: Any = None,
        trust_code: bool = False,
        exits: bool = False,
        exit_head: str | None = None,
    ) -> Cohort:
        """Build, cut and connect the networks.

        Args:
            nets: torchvision names, ``package.module:callable`` or modules.
            cuts: shared cut names or one list per net (same count for every net).
            image_size: side of the square inputs, to record boundary shapes.
            always_adapt: adapters between every pair of different nets, even where
                the shapes agree (identity-initialised then).
            transform_net: optional ``fn(net) -> net`` applied before cutting (e.g.
                distributed BatchNorm).
            trust_code: allow nets named by code outside the trusted packages (see
                :mod:`surgery.core.trust`).
            exits: an exit head after every part but the last of every net (:mod:`xross.cohort.exits`),
                built after everything else, so that the nets and adapters start as without them.
            exit_head: ``module:callable`` making each head (default pool + linear).
            text: causal LMs (:mod:`xross.cohort.lm`): built without ``num_classes``, checked against the
                vocabulary and window length, cut (``block:N`` too) on a window of token ids.
            require_stitches: False: a pair of nets whose boundary no adapter maps (a LLaMA and a GPT-2 decoder
                hand over different side values) is left unstitched, and :meth:`paths` omits the paths across it
                (methods without cross paths); True: one line naming the pair.
        """
        per_net_cuts = normalise_cuts(cuts, len(nets))
        example: Any = torch.zeros(1, 3, image_size, image_size) if text is None else token_example(text.seq_len)
        pieces, names, wholes = [], [], []
        for k, (src, net_cuts) in enumerate(zip(nets, per_net_cuts)):
            net = build_net(src, num_classes, stem, trust_code=trust_code)
            if text is not None:
                net = check_lm(net, text.vocab, text.seq_len, f"net {k} ({src if isinstance(src, str) else ''})")
                net_cuts = resolve_cuts(net, net_cuts)
                net = net.to(text.dtype)
            if transform_net is not None:
                net = transform_net(net)
            cut_net = surgery.cut(net.eval(), net_cuts, example)
            pieces.append(cut_net.train())
            wholes.append(net)
            names.append(src if isinstance(src, str) else type(src).__name__)
        adapters: dict[str, nn.Module] = {}
        unstitched: dict[tuple[int, int, int], str] = {}
        for b in range(len(per_net_cuts[0])):
            for i, j in itertools.permutations(range(len(nets)), 2):
                down = piece_info(pieces[j][b + 1])
                try:
                    ad = boundary_adapter(
                        _recorded(piece_info(pieces[i][b]).out_specs),
                        _recorded(down.in_specs),
                        down.in_names,
                        always=always_adapt,
                        batchnorm=adapter_batchnorm,
                        relu=adapter_relu,
                    )
                except SurgeryError as e:
                    if not require_stitches:
                        unstitched[(b, i, j)] = f"nets {i} and {j} at cut {b}: {e}"
                        continue
                    raise XrossError(
                        f"nets {i} and {j} at cut {b} ({per_net_cuts[i][b]} / {per_net_cuts[j][b]}): {e}"
                    ) from None
                if ad is not None:
                    adapters[adapter_key(b, i, j)] = ad
        heads = None
        if exits:
            shapes = [[_out_shape(net[b]) for b in range(len(net) - 1)] for net in pieces]
            assert num_classes is not None, "exit heads classify: a causal_lm config refuses exits"
            heads = ExitHeads.build(shapes, num_classes, head_factory(exit_head, trust_code=trust_code))
        cohort = cls(pieces, adapters, names, heads, wholes)
        cohort.unstitched, cohort.text = unstitched, text
        return cohort

    # --- structure ------------------------------------------------------------------------------

    @property
    def num_nets(self) -> int:
        return len(self.nets)

    @property
    def num_parts(self) -> int:
        return len(self._net(0))

    def _net(self, net: int) -> surgery.Pieces:
        return cast(surgery.Pieces, self.nets[net])  # the ModuleList holds the Pieces it was built from

    def part(self, net: int, index: int) -> nn.Module:
        return self._net(net)[index]

    def adapter(self, boundary: int, src: int, dst: int) -> nn.Module | None:
        """The adapter from net ``src``'s part ``boundary`` to net ``dst``'s next part (None: shapes agree)."""
        if src == dst:
            return None
        return (
            self.adapters[adapter_key(boundary, src, dst)] if adapter_key(boundary, src, dst) in self.adapters else None
        )

    def paths(self) -> list[Route]:
        """All K**P paths, in lexicographic order (own paths included), less those across an unstitched pair."""
        every = itertools.product(range(self.num_nets), repeat=self.num_parts)
        return [p for p in every if not any((b, p[b], p[b + 1]) in self.unstitched for b in range(len(p) - 1))]

    def own_path(self, net: int) -> Route:
        return (net,) * self.num_parts

    def cross_paths(self, student: int, teacher: int, single: bool = False) -> list[Route]:
        """Paths using only parts of ``student`` and ``teacher``, at least one of each (2**P - 2).

        ``single=True`` keeps those that differ from the student's own path in exactly one part.
        """
        own = self.own_path(student)
        out = [p for p in itertools.product((student, teacher), repeat=self.num_parts) if len(set(p)) == 2]
        if single:
            out = [p for p in out if sum(a != b for a, b in zip(p, own)) == 1]
        return out

    def modules_of(self, path: Route) -> list[nn.Module]:
        """Parts and adapters a path runs through, in order."""
        mods: list[nn.Module] = []
        for p, net in enumerate(path):
            if p > 0:
                ad = self.adapter(p - 1, path[p - 1], net)
                if ad is not None:
                    mods.append(ad)
            mods.append(self.part(net, p))
        return mods

    def net_parameters(self, net: int) -> list[nn.Parameter]:
        return list(self.nets[net].parameters())

    def adapter_parameters(self, touching: int | None = None, side: str = "any") -> list[nn.Parameter]:
        """Adapter parameters; with ``touching``, those of adapters leaving (``side='src'``),
        entering (``'dst'``) or either (``'any'``) that net."""
        out = []
        for key, ad in self.adapters.items():
            _, src, dst = parse_adapter_key(key)
            if (
                touching is None
                or (side in ("src", "any") and src == touching)
                or (side in ("dst", "any") and dst == touching)
            ):
                out += list(ad.parameters())
        return out

    def path_name(self, path: Route) -> str:
        return " > ".join(self.names[n] for n in path)

    # --- computation ----------------------------------------------------------------------------

    def forward_paths(
        self, x: torch.Tensor, paths: Iterable[Route], shared: bool = True, prefixes: dict[Route, Any] | None = None
    ) -> dict[Route, torch.Tensor]:
        """Logits of each path on ``x``.

        With ``shared=True`` (default) every distinct prefix is computed once (a prefix
        tree); ``shared=False`` computes each path from scratch (the reference). A dict
        given as ``prefixes`` receives the value after every prefix computed (what exit
        heads read).
        """
        results: dict[Route, torch.Tensor] = {}
        memo: dict[Route, Any] = {}
        for path in paths:
            if not shared:
                memo = {}
            for p in range(self.num_parts):
                key = path[: p + 1]
                if key in memo:
                    continue
                memo[key] = self.step(key, x if p == 0 else memo[key[:-1]])
                if prefixes is not None:
                    prefixes[key] = memo[key]
            results[path] = as_logits(memo[path], "a path of the cohort")
        return results

    def step(self, prefix: Route, value: Any) -> Any:
        """The value after ``prefix`` from the value after ``prefix[:-1]`` (the input for a first part):
        the adapter between the two nets, if any, then the part."""
        p = len(prefix) - 1
        if p > 0:
            ad = self.adapter(p - 1, prefix[-2], prefix[-1])
            if ad is not None:
                value = call_part(ad, value)
        return call_part(self.part(prefix[-1], p), value)

    def forward(self, x: torch.Tensor, path: Route | None = None) -> torch.Tensor:
        """Logits of one path (default: net 0 itself)."""
        path = path if path is not None else self.own_path(0)
        return self.forward_paths(x, [path])[path]

    def example_input(self, image_size: int) -> torch.Tensor:
        """One input of the nets: an image of side ``image_size`` (zeros), or, for causal LMs, a window of ids."""
        ref = next(self.parameters())
        if self.text is not None:
            return token_example(self.text.seq_len, ref.device).args[0]
        return torch.zeros(1, 3, image_size, image_size, dtype=ref.dtype, device=ref.device)

    def forward_flops(self, paths: Iterable[Route], image_size: int) -> int:
        """Forward FLOPs per sample (an image, or a window of tokens) of computing ``paths`` (every shared prefix
        once, as a training step does)."""
        x = self.example_input(image_size)
        with torch.no_grad():
            return surgery.count_flops(_PathsCall(self, list(paths)), x)

    def export_path(self, path: Route) -> surgery.Pieces:
        """The path as a standalone :class:`surgery.Pieces` (shares parameters with the cohort)."""
        if len(path) != self.num_parts or not all(0 <= n < self.num_nets for n in path):
            raise XrossError(f"path {list(path)} needs {self.num_parts} net indices in 0..{self.num_nets - 1}")
        return surgery.Pieces(self.modules_of(path))


class _PathsCall(nn.Module):
    """Calling it computes the cohort's ``paths`` (what :meth:`Cohort.forward_flops` counts)."""

    def __init__(self, cohort: Cohort, paths: list[Route]):
        super().__init__()
        self.cohort, self.paths = cohort, paths

    def forward(self, x: torch.Tensor) -> dict[Route, torch.Tensor]:
        return self.cohort.forward_paths(x, self.paths)


def call_part(module: nn.Module, value: Any) -> Any:
    """A part or adapter on what the previous one returned (a boundary of several values comes as a tuple)."""
    return module(*value) if isinstance(value, tuple) else module(value)


def adapter_key(boundary: int, src: int, dst: int) -> str:
    return f"b{boundary}_{src}to{dst}"


def parse_adapter_key(key: str) -> tuple[int, int, int]:
    b, _, rest = key[1:].partition("_")
    src, _, dst = rest.partition("to")
    return int(b), int(src), int(dst)


def parse_path(text: str, num_nets: int, num_parts: int) -> Route:
    """``"0,1" -> (0, 1)`` with range checks."""
    try:
        path = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise XrossError(f"path '{text}' is not comma-separated net indices like 0,1") from None
    if len(path) != num_parts or not all(0 <= n < num_nets for n in path):
        raise XrossError(f"path '{text}' needs {num_parts} net indices in 0..{num_nets - 1}")
    return path
