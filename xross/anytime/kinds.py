"""The kinds of run, registered once in the table (:data:`xross.run.table.KINDS`): what each is, and how
``xross eval|export|profile|train`` load, evaluate, export, time and print one.

* ``cohort``: K nets cut into P parts (independent, kd, dml, xml and any cohort method); every stitched
  path is a network.
* ``slim``: one slimmable net (mutualnet); every width-resolution setting is a network.
* ``student``: one distilled student, evaluated beside its teachers.

They live here, above the methods, because printing a slim run's settings and timing a cohort's
pieces use the query and latency tables of this room. A new kind of run registers a
:class:`~xross.run.table.RunKind` like these (from any module imported with its method).

>>> from xross.run.table import KINDS
>>> KINDS.names()
['cohort', 'slim', 'student']
>>> KINDS.get("slim").flops_on(None)
"float32:1x3xRxR, R the row's resolution"
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.graph.flops import FLOPS_COLUMN, CountedOn, human, per_sample
from surgery.graph.inputs import InputSpec
from xross.anytime.latency import LatencyEntry, batch1_ms, measure, piece_entries
from xross.anytime.query import COLUMNS, row_values
from xross.cohort.grid import Cohort, Route, parse_path
from xross.errors import XrossError
from xross.methods.mutualnet import calibration_images, evaluate_settings, setting_name, standalone_setting
from xross.run.config import DistillConfig, TrainConfig
from xross.run.directory import DTYPES, load_run, load_slim, load_student
from xross.run.evaluate import EvalResult, distillation_gap, evaluate, evaluate_distillation, pareto_front
from xross.run.table import ExportChoice, ResultTable, RunKind, register_kind
from xross.run.teachers import load_teachers, select_paths

Batches = Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]  # the evaluation batches, decoded when called
Prepare = Callable[[], None]  # readies the output directory (called once the export is known to be possible)
Exported = tuple[nn.Module, str]  # the module to save and what it is, for the command's last line
Taught = tuple[nn.Module, list[Route] | None, list[str]]  # a run as teachers: module, its paths, their names


def image_input(cfg: Any) -> CountedOn:
    """The input a run of one image size counts its FLOPs on: one image of that size."""
    side = cfg.image_size
    return [InputSpec(shape=[1, 3, side, side])] if side else "float32:1x3xSxS, S the side of the run's images"


def _image(cfg: Any, size: int | None = None) -> torch.Tensor:
    return torch.zeros(1, 3, size or cfg.image_size or 32, size or cfg.image_size or 32, dtype=DTYPES[cfg.dtype])


def _refuse_setting(run: Path, choice: ExportChoice) -> None:
    if choice.width is not None or choice.resolution is not None:
        raise XrossError(f"'{run}' is not a mutualnet run: --width/--resolution do not apply; drop them")


def _scores(entry: Any, on: Any) -> tuple[str, ...]:
    """A path's or an exit's cells: name, top-1, top-5, params, FLOPs per sample (counted on ``on``)."""
    flops = human(per_sample(entry.flops, on))
    return entry.name, f"{entry.top1:.2f}", f"{entry.top5:.2f}", human(entry.params), flops


# --- cohort -------------------------------------------------------------------------------------


def _evaluate_cohort(run: Path, cfg: TrainConfig, cohort: Cohort, batches: Batches, **_: Any) -> EvalResult:
    return evaluate(cohort, batches(), cfg.image_size or 0)


def _export_path(run: Path, choice: ExportChoice, *, trust_code: bool, verify: bool, prepare: Prepare) -> Exported:
    _refuse_setting(run, choice)
    if choice.path is None:
        raise XrossError(f"which path of '{run}'? give --path with a net index per part, e.g. --path 0,1")
    prepare()
    _, cohort = load_run(run, trust_code=trust_code, verify=verify)
    chosen = parse_path(choice.path, cohort.num_nets, cohort.num_parts)
    return cohort.export_path(chosen), f"path {choice.path} ({cohort.path_name(chosen)})"


def _cohort_teacher(text: str, run: Path, which: str, *, trust_code: bool, verify: bool) -> Taught:
    _, cohort = load_run(run, trust_code=trust_code, verify=verify)
    paths = select_paths(cohort, which, text)
    return cohort, paths, [f"{text}@{'-'.join(map(str, p))}" for p in paths]


def _profile_cohort(cfg: TrainConfig, cohort: Cohort, batch: int, repeats: int) -> dict[str, LatencyEntry]:
    x = _image(cfg)
    entries = {cohort.path_name(p): measure(cohort.export_path(p), x, batch, repeats) for p in cohort.paths()}
    entries.update(piece_entries(cohort, x, batch, repeats))
    return entries


def _show_cohort(cfg: TrainConfig, result: EvalResult, run: Path) -> list[ResultTable]:
    on = image_input(cfg)
    front = {r.path for r in pareto_front(result.paths)}
    rows = [
        (",".join(map(str, r.path)), *_scores(r, on), "*" if r.path in front else "")
        for r in sorted(result.paths, key=lambda r: r.params)
    ]
    columns = ["path", "parts", "top-1", "top-5", "params", FLOPS_COLUMN, "pareto"]
    tables = [ResultTable(f"paths of {run} ({result.counted_on()})", columns, rows, flops_on=on)]
    if len(result.paths) > 1:  # one net alone: its ensembles are itself
        ens = [(k, f"{v.top1:.2f}", f"{v.top5:.2f}") for k, v in result.ensembles.items()]
        tables.append(ResultTable("ensembles (mean softmax)", ["members", "top-1", "top-5"], ens))
    if result.exits:
        rows = [("-".join(map(str, e.prefix)), *_scores(e, on)) for e in result.exits]
        columns = ["after parts", "nets", "top-1", "top-5", "params", FLOPS_COLUMN]
        tables.append(ResultTable("exits (the head after the parts run so far)", columns, rows, flops_on=on))
    return tables


# --- slim (mutualnet) ---------------------------------------------------------------------------


def _evaluate_slim(
    run: Path, cfg: TrainConfig, slim: Any, batches: Batches, *, progress: Callable[[str], None] | None = None, **_: Any
) -> EvalResult:
    calibration = calibration_images(cfg, DTYPES[cfg.dtype])
    return evaluate_settings(slim, calibration, batches(), *cfg.grid(), progress=progress)


def _export_setting(run: Path, choice: ExportChoice, *, trust_code: bool, verify: bool, prepare: Prepare) -> Exported:
    cfg, slim = load_slim(run, trust_code=trust_code, verify=verify)
    if choice.path is not None:
        raise XrossError(f"'{run}' is a mutualnet run: it has settings, not paths; drop --path, give --width")
    width, resolution = choice.width, choice.resolution
    if width is None or resolution is None:
        widths, resolutions = cfg.grid()
        raise XrossError(
            f"which setting of '{run}'? give --width (e.g. {widths[-1]:g}) and --resolution (one of "
            f"{', '.join(map(str, resolutions))}); `xross best {run} --max-flops ...` picks one"
        )
    slim.width = width  # validates the width before any data is decoded or anything written
    prepare()
    pieces = standalone_setting(cfg, slim, width, resolution)
    return pieces, f"{cfg.nets[0]} at width {width:g}, {resolution}px ({len(pieces)} pieces)"


def _profile_slim(cfg: TrainConfig, slim: Any, batch: int, repeats: int) -> dict[str, LatencyEntry]:
    widths, resolutions = cfg.grid()
    entries = {}
    for w in widths:
        net = slim.extract(w)
        for r in resolutions:
            entries[setting_name(w, r)] = measure(net, _image(cfg, r), batch, repeats)
    return entries


def _show_slim(cfg: TrainConfig, result: EvalResult, run: Path) -> list[ResultTable]:
    latency = batch1_ms(run)
    rows = [tuple(row_values(r, latency)) for r in sorted(result.paths, key=lambda r: -r.flops)]
    title = f"{run}: every width and resolution ({result.counted_on()})"
    return [ResultTable(title, COLUMNS, rows, flops_on=_slim_input(cfg))]


def _slim_input(cfg: Any) -> CountedOn:
    return "float32:1x3xRxR, R the row's resolution"


# --- student (distillation) ---------------------------------------------------------------------


def _evaluate_student(
    run: Path, cfg: DistillConfig, student: nn.Module, batches: Batches, *, trust_code: bool, verify: bool, **_: Any
) -> EvalResult:
    # models first: names from the run's files are refused before any data is decoded
    teachers, weights = load_teachers(
        cfg.teacher, cfg.teacher_paths, cfg.teacher_weights, dtype=cfg.dtype, trust_code=trust_code, verify=verify
    )
    return evaluate_distillation(student, teachers, weights, batches(), cfg.image_size or 0, student_name=cfg.student)


def _export_student(run: Path, choice: ExportChoice, *, trust_code: bool, verify: bool, prepare: Prepare) -> Exported:
    _refuse_setting(run, choice)
    if choice.path is not None:
        raise XrossError(f"'{run}' is a distillation run: it has one student and no paths; drop --path")
    prepare()
    cfg, student = load_student(run, trust_code=trust_code, verify=verify)
    return student, f"the student ({cfg.student}) of {run}"


def _student_teacher(text: str, run: Path, which: str, *, trust_code: bool, verify: bool) -> Taught:
    return load_student(run, trust_code=trust_code, verify=verify)[1], None, [f"{text} (student)"]


def _profile_student(cfg: DistillConfig, student: nn.Module, batch: int, repeats: int) -> dict[str, LatencyEntry]:
    return {cfg.student: measure(student, _image(cfg), batch, repeats)}


def _show_student(cfg: DistillConfig, result: EvalResult, run: Path) -> list[ResultTable]:
    rows: list[tuple[str, ...]] = [
        (r.role, r.name, f"{r.top1:.2f}", f"{r.top5:.2f}", human(r.params), human(r.flops)) for r in result.paths
    ]
    for name, acc in result.ensembles.items():
        members = f"mean softmax of the {len(result.paths) - 1} {name}"
        rows.append(("ensemble", members, f"{acc.top1:.2f}", f"{acc.top5:.2f}", "", ""))
    gap = distillation_gap(result)
    columns = ["role", "network", "top-1", "top-5", "params", FLOPS_COLUMN]
    title = f"distillation {run} ({result.counted_on()})"
    after = f"student - ensemble: {gap:+.2f} top-1 points" if gap is not None else None
    return [ResultTable(title, columns, rows, flops_on=image_input(cfg), after=after)]


COHORT = register_kind(
    RunKind("cohort", "training run of a cohort", "a cohort of paths", load_run, _evaluate_cohort, _export_path,
            _profile_cohort, _show_cohort, image_input, _cohort_teacher)
)  # fmt: skip
SLIM = register_kind(
    RunKind("slim", "mutualnet run", "one net at many widths", load_slim, _evaluate_slim, _export_setting,
            _profile_slim, _show_slim, _slim_input, _cohort_teacher)  # load_run refuses: not a cohort
)  # fmt: skip
STUDENT = register_kind(
    RunKind("student", "distillation run", "one student", load_student, _evaluate_student, _export_student,
            _profile_student, _show_student, image_input, _student_teacher)
)  # fmt: skip
