"""A cohort of causal LMs as a ``causal_lm`` config describes it, and the paths it can train.

A LLaMA and a GPT-2 decoder hand over different side values at a layer boundary (rotary tables, a mask),
which no adapter maps: such a pair stays unstitched (:attr:`Cohort.unstitched`); methods without cross
paths (independent, dml) train it, and :func:`refuse_unstitched` refuses in one line a method whose paths
cross it (xml).
"""

from __future__ import annotations

from typing import Any

import torch

from xross.cohort.grid import Cohort, Route
from xross.cohort.lm import TextNets
from xross.errors import XrossError

__all__ = ["lm_cohort", "lm_epoch_metrics", "refuse_unstitched"]


def lm_cohort(config: Any, vocab: int, device: torch.device, *, trust_code: bool = False) -> Cohort:
    """The cohort of causal LMs a ``causal_lm`` config describes, seeded, on ``device``; a pair of nets no
    adapter stitches stays apart (:func:`refuse_unstitched` refuses a method whose paths cross it)."""
    torch.manual_seed(config.seed)
    cohort = Cohort.build(
        config.nets,
        config.per_net_cuts(),
        None,
        text=TextNets(vocab, config.seq_len, getattr(torch, config.dtype)),  # "float32" or "float64"
        require_stitches=False,
        adapter_batchnorm=config.adapter_batchnorm,
        always_adapt=config.always_adapt,
        trust_code=trust_code,
    )
    return cohort.to(device)


def refuse_unstitched(cohort: Cohort, paths: list[Route], mode: str) -> None:
    """One line if a path the method trains crosses a pair of nets that no adapter stitches."""
    for path in paths:
        for b in range(len(path) - 1):
            why = cohort.unstitched.get((b, path[b], path[b + 1]))
            if why is not None:
                raise XrossError(
                    f"{mode} trains stitched paths, but {why}; cut nets of one family (the same side values) "
                    "or train them with --mode dml"
                )


def lm_epoch_metrics(result: Any, num_nets: int, num_parts: int) -> dict[str, float]:
    """epochs.csv's row of an evaluation of causal LMs: each net's loss, perplexity and next-token top-1."""
    row: dict[str, float] = {}
    for i in range(num_nets):
        r = result.own(i, num_parts)
        row.update({f"loss_net{i}": float(r.loss), f"ppl_net{i}": float(r.perplexity), f"top1_net{i}": r.top1})
    row["ppl_ensemble"] = float(result.ensembles["nets"].perplexity)
    return row
