"""Where to split a network between a device and a server, by end-to-end latency (Neurosurgeon's rule).

Kang et al., *Neurosurgeon: Collaborative Intelligence Between the Cloud and Mobile
Edge* (ASPLOS 2017): run everything up to a cut on the device, send the values that
cross the cut, run the rest on the server, and pick the cut with the lowest total

    flops_so_far / device_flops + crossing_bytes / bandwidth + (total_flops - flops_so_far) / server_flops

Units: FLOP/s for the two speeds, bytes/s for the bandwidth (``12.5M`` is 12.5 MB/s,
100 Mbit/s), FLOPs as :func:`surgery.count_flops` counts them (a multiply-add is 2),
bytes per sample. Running everything on the device sends nothing; running everything
on the server sends the input. Returning the result to the device is not counted.

>>> from surgery.pieces.cutpoints import CutPoint
>>> points = [CutPoint("stem", "module", "stem", 3, 1, 1, flops=1e9, bytes=800_000),
...           CutPoint("layer2", "module", "layer2", 9, 1, 1, flops=3e9, bytes=100_000)]
>>> ranked = rank_splits(points, device_flops=10e9, server_flops=1e12, bandwidth=1e6,
...                      total_flops=5e9, input_bytes=600_000)
>>> [(c.name, round(c.total_s * 1e3)) for c in ranked]   # ms
[('layer2', 402), ('(all on device)', 500), ('(all on server)', 605), ('stem', 904)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from surgery.core.errors import SurgeryError
from surgery.graph.flops import count_flops, parse_human
from surgery.graph.fx import LeafSpec
from surgery.graph.inputs import Example
from surgery.pieces.cutpoints import CutPoint, cut_points, value_bytes

ALL_ON_DEVICE = "(all on device)"
ALL_ON_SERVER = "(all on server)"


@dataclasses.dataclass(frozen=True)
class SplitChoice:
    """One way to split: the device runs ``device_work`` FLOPs, sends ``bytes_sent``, the server does the rest.

    ``position`` is the cut's position in the graph (-1 for all on the server, None for
    all on the device); times are in seconds.
    """

    name: str
    position: int | None
    device_work: float
    bytes_sent: float
    device_s: float
    transfer_s: float
    server_s: float

    @property
    def total_s(self) -> float:
        return self.device_s + self.transfer_s + self.server_s

    @property
    def times(self) -> tuple[float, float, float, float]:
        """``(device_s, transfer_s, server_s, total_s)``."""
        return self.device_s, self.transfer_s, self.server_s, self.total_s


def _positive(value: Any, what: str, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SurgeryError(f"{what} must be a positive number of {unit}, got {value!r}")
    return float(value)


def parse_rate(text: str, what: str, unit: str) -> float:
    """A positive rate from text like ``10G``, ``1T``, ``12.5M`` (see :func:`surgery.graph.flops.parse_human`).

    >>> parse_rate("12.5M", "--bandwidth", "bytes/s")
    12500000.0
    """
    try:
        value = parse_human(text)
    except ValueError:
        raise SurgeryError(f"{what} '{text}' is not a number; write e.g. 10G, 1T or 12.5M") from None
    return _positive(value, what, unit)


def rank_splits(
    points: Sequence[CutPoint],
    device_flops: float,
    server_flops: float,
    bandwidth: float,
    total_flops: float | None = None,
    *,
    input_bytes: float | None = None,
    distinct: bool = True,
) -> list[SplitChoice]:
    """Every cut point (plus all on the device and all on the server), fastest first.

    Args:
        points: from :func:`surgery.cut_points` with an example input (they need
            ``flops`` and ``bytes``).
        device_flops, server_flops: speeds in FLOP/s; bandwidth: bytes/s (all > 0).
        total_flops: FLOPs of the whole network (:func:`surgery.count_flops`); default
            the largest ``flops`` of the points, which leaves out what follows the last one.
        input_bytes: bytes of one input sample, sent when everything runs on the server;
            without it that choice is left out.
        distinct: keep one point per graph position (the first: the shallowest module
            path), since aliases of one place cost the same.

    Ties keep graph order (all on the server first, all on the device last).
    """
    device_flops = _positive(device_flops, "device_flops", "FLOP/s")
    server_flops = _positive(server_flops, "server_flops", "FLOP/s")
    bandwidth = _positive(bandwidth, "bandwidth", "bytes/s")
    missing = next((p.name for p in points if p.flops is None or p.bytes is None), None)
    if missing is not None:
        raise SurgeryError(
            f"cut point '{missing}' has no FLOPs or crossing bytes; list the points with an example input: "
            "surgery.cut_points(model, x)"
        )
    if total_flops is None:
        total_flops = max((float(p.flops or 0) for p in points), default=0.0)
    most = max((p.flops or 0 for p in points), default=0)
    if not isinstance(total_flops, (int, float)) or not total_flops >= most:
        raise SurgeryError(
            f"total_flops ({total_flops!r}) is below the FLOPs before a cut point ({most}); "
            "pass surgery.count_flops(model, x)"
        )
    seen: set[int] = set()
    choices = []
    if input_bytes is not None:
        if not isinstance(input_bytes, (int, float)) or not input_bytes >= 0:
            raise SurgeryError(f"input_bytes must be a non-negative number of bytes, got {input_bytes!r}")
        server = total_flops / server_flops
        choices.append(SplitChoice(ALL_ON_SERVER, -1, 0, input_bytes, 0.0, input_bytes / bandwidth, server))
    for p in points:
        if distinct and p.position in seen:
            continue
        seen.add(p.position)
        work, sent = float(p.flops or 0), float(p.bytes or 0)
        device, transfer, server = work / device_flops, sent / bandwidth, (total_flops - work) / server_flops
        choices.append(SplitChoice(p.name, p.position, work, sent, device, transfer, server))
    choices.append(SplitChoice(ALL_ON_DEVICE, None, total_flops, 0, total_flops / device_flops, 0.0, 0.0))
    return sorted(choices, key=lambda c: c.total_s)


def suggest_splits(
    model: nn.Module,
    example_input: Any,
    device_flops: float,
    server_flops: float,
    bandwidth: float,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
) -> list[SplitChoice]:
    """:func:`rank_splits` over the module cut points of ``model``, measured on one sample of ``example_input``."""
    given = Example.required(example_input, "suggest_splits")
    one = lambda v: v[:1] if isinstance(v, torch.Tensor) and v.dim() else v  # noqa: E731 - one sample of each input
    example = Example(tuple(one(a) for a in given.args), {k: one(v) for k, v in given.kwargs.items()})
    points = cut_points(model, example, include_nodes=False, leaf_modules=leaf_modules)
    return rank_splits(
        points,
        device_flops,
        server_flops,
        bandwidth,
        total_flops=count_flops(model, *example.args, **example.kwargs),
        input_bytes=value_bytes(example.tensors()),
    )


__all__ = ["SplitChoice", "rank_splits", "suggest_splits", "parse_rate", "ALL_ON_DEVICE", "ALL_ON_SERVER"]
