"""Teachers: the fixed networks a student learns from (``kd`` training, ``xross distill``).

A teacher reference names one network, or several for an xross run directory:

=========================  ===========================================================
``runs/x1``                the run's K nets (``paths="full"``), every stitched path
                           (``"all"``) or the listed ones (``"0-1,1-0"``)
``runs/x1@0-1``            one path of a run
``runs/d1``                a distillation run: its student
``DIR``, ``DIR:INDEX``     a model or pieces saved by ``surgery.save`` / ``xross export``
``resnet18(weights=...)``  a model reference (:mod:`surgery.files.refs`) with a local weights file
=========================  ===========================================================

Paths of one run are computed through its cohort's prefix tree: a part shared by
several teacher paths runs once per batch. Teachers are in eval mode, frozen, and run
under ``no_grad``.

>>> import torch
>>> from xross.run.teachers import ensemble_probs
>>> logits = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
>>> ensemble_probs(logits, temperature=1.0, weights=torch.tensor([1.0, 1.0]))
tensor([[0.5000, 0.5000]])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from torch import nn

import surgery
from surgery.core.errors import UserError
from surgery.core.util import first_line
from surgery.files.refs import parse as parse_reference
from xross.cohort.grid import Cohort, Route
from xross.cohort.logits import as_logits
from xross.errors import XrossError
from xross.run.directory import DTYPES, run_config
from xross.run.table import kind_of


def ensemble_probs(logits: Sequence[torch.Tensor], temperature: float, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k softmax(t_k / T) / sum_k w_k``: the ensemble's soft target (float32 or wider)."""
    probs = torch.stack([t.float().div(temperature).softmax(1) for t in logits])
    w = weights.to(probs)
    return (probs * w[:, None, None]).sum(0) / w.sum()


def ensemble_logits(logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean of the teachers' logits (what MEAL V2's discriminator sees as "teacher")."""
    stacked = torch.stack([t.float() for t in logits])
    w = weights.to(stacked)
    return (stacked * w[:, None, None]).sum(0) / w.sum()


def select_paths(cohort: Cohort, which: str, run: str) -> list[Route]:
    """The paths ``which`` (``full``, ``all`` or ``0-1,1-0``) names in a run-directory teacher's cohort."""
    if which == "full":
        return [cohort.own_path(i) for i in range(cohort.num_nets)]
    if which == "all":
        return cohort.paths()
    paths = []
    for text in which.split(","):
        path = tuple(int(t) for t in text.split("-"))
        if len(path) != cohort.num_parts or not all(0 <= n < cohort.num_nets for n in path):
            raise XrossError(
                f"teacher path {text} of '{run}' needs {cohort.num_parts} net indices in 0..{cohort.num_nets - 1}"
            )
        paths.append(path)
    return paths


class Teachers(nn.Module):
    """Frozen teacher networks and cohorts; calling it gives every teacher's logits, in order."""

    def __init__(self, sources: Sequence[nn.Module], paths: Sequence[list[Route] | None], names: Sequence[str]):
        super().__init__()
        self.sources = nn.ModuleList(sources)
        self.paths = list(paths)  # per source: the cohort paths it contributes, None for a single network
        self.names = list(names)
        self.eval().requires_grad_(False)

    def __len__(self) -> int:
        return len(self.names)

    def train(self, mode: bool = True) -> Teachers:
        return super().train(False)  # always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for source, paths in zip(self.sources, self.paths):
            if paths is None:
                out.append(as_logits(source(images), "a teacher"))
            else:
                logits = cast(Cohort, source).forward_paths(images, paths)
                out += [logits[p] for p in paths]
        return out

    def members(self) -> list[tuple[str, nn.Module, Route | None]]:
        """Each teacher as (name, network or cohort, its cohort path or None)."""
        rows: list[tuple[str, nn.Module, Route | None]] = []
        names = iter(self.names)
        for source, paths in zip(self.sources, self.paths):
            for path in paths if paths is not None else [None]:
                rows.append((next(names), source, path))
        return rows


def _load_one(
    text: str, which: str, *, trust_code: bool, verify: bool
) -> tuple[nn.Module, list[Route] | None, list[str]]:
    ref = parse_reference(text)
    if ref.kind == "run":  # what a run teaches with is its kind's to say (xross.run.table)
        run = Path(ref.target)
        return kind_of(run_config(run)).teacher(text, run, which, trust_code=trust_code, verify=verify)
    model = surgery.refs.load(text, trust_code=trust_code, trust_typed=trust_code, verify=verify)
    return model, None, [text]


def load_teachers(
    references: Sequence[str],
    paths: str = "full",
    weights: Sequence[float] | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    trust_code: bool = False,
    verify: bool = True,
) -> tuple[Teachers, torch.Tensor]:
    """The teachers ``references`` name (see the module doc) and their ensemble weights.

    ``paths`` picks the paths of run-directory teachers; ``weights`` gives one weight per
    resulting teacher (default: equal). A teacher that fails to load is one line naming it.
    """
    if not references:
        raise XrossError("no teachers given; name at least one with --teacher")
    sources, chosen, names = [], [], []
    for text in references:
        try:
            source, source_paths, source_names = _load_one(text, paths, trust_code=trust_code, verify=verify)
        except UserError as e:
            raise XrossError(f"teacher '{text}' could not be loaded: {e}") from None
        except (OSError, RuntimeError, ValueError) as e:
            raise XrossError(f"teacher '{text}' could not be loaded: {first_line(e, 200)}") from None
        sources.append(source)
        chosen.append(source_paths)
        names += source_names
    if not names:
        raise XrossError("the teacher paths select no network; check --teacher-paths")
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise XrossError(
            f"--teacher-weights gives {len(weights)} weights but there are {len(names)} teachers ({', '.join(names)})"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise XrossError("--teacher-weights must be non-negative with a positive sum")
    teachers = Teachers(sources, chosen, names).to(device=device, dtype=DTYPES[dtype])
    return teachers, torch.tensor(list(weights), dtype=torch.float64, device=device)


def check_classes(teachers: Teachers, num_classes: int, image_size: int, dtype: torch.dtype, what: str) -> None:
    """Refuse, in one line, teachers whose outputs do not have ``num_classes`` classes."""
    device = next(teachers.parameters()).device
    x = torch.zeros(2, 3, image_size, image_size, device=device, dtype=dtype)
    try:
        outputs = teachers(x)
    except (RuntimeError, ValueError, TypeError) as e:
        raise XrossError(f"the teachers fail on {image_size}x{image_size} images: {first_line(e, 200)}") from None
    for name, out in zip(teachers.names, outputs):
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise XrossError(
                f"teacher '{name}' gives outputs of shape {shape} but {what} has {num_classes} classes; "
                "use teachers trained on the same classes"
            )
