"""The optimiser across a growth: rebuilt over the grown parameters, its state carried or reset.

``carry`` gives each element of a grown parameter the state of the element it copies
(:func:`growth.lineage`), scaled as its gradient is scaled while the copies are equal,
``s = 1 / (N * a)`` (N copies, weight scale a): first moments (SGD's momentum buffer, Adam's
``exp_avg``) by ``s``, second moments (``exp_avg_sq``) by ``s**2``. A copy's first update is
then the update its original would have taken, scaled as its gradient is (SGD), or exactly the
original's step (Adam: ``s m / sqrt(s**2 v) = m / sqrt(v)``); docs/RESEARCH.md derives both.
New elements start with zero moments; Adam's step count is the copied parameter's. ``reset``
starts the state of every parameter of a grown net afresh (the op rebuilt the net; a parameter it
did not change is a new tensor too). The nets a growth did not grow keep theirs.

>>> import torch
>>> from growth.provenance import Origin
>>> from xross.run.carry import carried_state
>>> old = torch.nn.Parameter(torch.ones(2))
>>> state = {"momentum_buffer": torch.tensor([1.0, 4.0])}
>>> origin = Origin([old], torch.tensor([0, 1, 1]), torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64))
>>> carried_state({old: state}, origin, torch.Size([3]))["momentum_buffer"].tolist()
[1.0, 2.0, 2.0]
"""

from __future__ import annotations

from typing import Any

import torch

from growth.provenance import Origin
from xross.errors import XrossError

# the power of the gradient scale each kind of state scales by (the torch optimisers the run config offers)
MOMENT_POWER = {"momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
CARRY_MODES = ("carry", "reset")


def carried_state(
    old_state: Any, origin: Origin, shape: torch.Size, flats: dict[tuple[int, str], torch.Tensor] | None = None
) -> dict[str, Any]:
    """The optimiser state of a grown parameter of ``shape`` from the state of its origin's sources
    (``flats`` caches their concatenated state across the parameters grown from the same sources)."""
    states = [old_state.get(p, {}) for p in origin.sources]
    keys = list(dict.fromkeys(k for s in states for k in s))
    kept = origin.index >= 0
    out: dict[str, Any] = {}
    for key in keys:
        if key == "step":
            steps = [s["step"] for s in states if "step" in s]
            out["step"] = max(steps, key=float).clone() if isinstance(steps[0], torch.Tensor) else max(steps)
            continue
        if key not in MOMENT_POWER and any(isinstance(s.get(key), torch.Tensor) for s in states):
            raise XrossError(
                f"the optimiser's state '{key}' has no rule to carry it through a growth; use --grow-optimizer reset"
            )
        like = next(s[key] for s in states if key in s)
        if not isinstance(like, torch.Tensor):  # e.g. a momentum buffer not made yet
            continue
        cache = flats if flats is not None else {}
        if (id(origin.sources), key) not in cache:
            cache[id(origin.sources), key] = torch.cat(
                [
                    (s[key] if key in s else torch.zeros(p.shape, dtype=like.dtype, device=like.device)).reshape(-1)
                    for p, s in zip(origin.sources, states)
                ]
            )
        flat = cache[id(origin.sources), key]
        value = torch.zeros(origin.index.numel(), dtype=like.dtype, device=like.device)
        index = origin.index.reshape(-1).to(like.device)
        factor = origin.scale.reshape(-1).to(like.device) ** MOMENT_POWER[key]
        value[kept.reshape(-1)] = (flat[index[kept.reshape(-1)]].double() * factor[kept.reshape(-1)]).to(like.dtype)
        out[key] = value.reshape(shape)
    return out


def rebuild(
    old: torch.optim.Optimizer, new: torch.optim.Optimizer, origins: dict[torch.nn.Parameter, Origin], mode: str
) -> torch.optim.Optimizer:
    """Fill ``new`` (built over the grown parameters) from ``old``: a parameter both hold keeps its state; a
    grown one gets its carried state (``mode="carry"``) or none (``"reset"``)."""
    if mode not in CARRY_MODES:
        raise XrossError(f"grow optimizer '{mode}' is one of {', '.join(CARRY_MODES)}")
    flats: dict[tuple[int, str], torch.Tensor] = {}
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = dict(old.state[p])
            elif mode == "carry" and p in origins:
                state = carried_state(old.state, origins[p], p.shape, flats)
                if state:
                    new.state[p] = state
    return new
