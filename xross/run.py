"""A finished (or interrupted) run directory, read back: its config, its cohort with the newest good weights.

``RUN@0-1`` model references (:mod:`surgery.refs`) resolve here: the path through the
run's cohort as a standalone :class:`surgery.Pieces`.
"""

from __future__ import annotations

from pathlib import Path

import torch

import surgery
from surgery._util import first_line
from surgery.refs import register_run_loader
from xross.checkpoint import CheckpointDir
from xross.cohort import Cohort
from xross.config import TrainConfig
from xross.errors import XrossError
from xross.trainer import DTYPES, build_cohort


def load_run(run: Path, *, trust_code: bool = False, verify: bool = True) -> tuple[TrainConfig, Cohort]:
    """The run's config and its cohort (eval mode, on the CPU) with the weights of its newest good checkpoint."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise XrossError(f"'{run}' is not a run directory (no config.yaml); train one with `xross train --out {run}`")
    cfg = TrainConfig.load(run / "config.yaml")
    cohort = build_cohort(cfg, torch.device("cpu"), trust_code=trust_code)
    path, state = CheckpointDir(run).load_latest(verify)
    try:
        cohort.load_state_dict(state["cohort"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise XrossError(f"checkpoint {path} does not fit the run's config ({first_line(e, 160)})") from None
    return cfg, cohort.to(DTYPES[cfg.dtype]).eval()


@register_run_loader
def run_path(run: Path, path: tuple[int, ...], *, trust_code: bool = False, verify: bool = True) -> surgery.Pieces:
    """One path through the run's cohort (``runs/x1@0-1``) as standalone pieces, with the run's weights."""
    _, cohort = load_run(run, trust_code=trust_code, verify=verify)
    if len(path) != cohort.num_parts or not all(0 <= n < cohort.num_nets for n in path):
        raise XrossError(
            f"'{run}@{'-'.join(map(str, path))}' needs {cohort.num_parts} net indices in 0..{cohort.num_nets - 1}"
        )
    return cohort.export_path(path)
