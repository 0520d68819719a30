"""The one table of xross: every training method and every kind of run, each registered once.

A :class:`Method` (``independent``, ``kd``, ``dml``, ``xml``, ``mutualnet``, ``distill``, or
yours) says which engine trains it, its objective, whether it needs teachers and which
:class:`RunKind` its runs are; it is registered next to its implementation
(:mod:`xross.methods`). A :class:`RunKind` (``cohort``, ``slim``, ``student``) knows how to
load, evaluate, export, profile and print a finished run of its kind (registered in
:mod:`xross.anytime.kinds`). Every place that asks "what kind of run is this" asks
:func:`method_of` or :func:`kind_of`, the table's only lookups.

Which config fields apply to which method is declared once, on the fields, with
:func:`uses` (a field without it applies to every method); :func:`unused_option`
refuses a field set for a method that does not use it, :func:`objective_options`
passes a method's own fields to its objective.

>>> from xross.run.table import METHODS, method_of
>>> from xross.run.config import TrainConfig
>>> sorted(METHODS.names())[:3]
['distill', 'dml', 'independent']
>>> method_of(TrainConfig(mode="kd", teacher=["runs/t"])).needs_teacher
True
>>> TrainConfig.from_dict({"mode": "dml", "sandwich": 3})
Traceback (most recent call last):
...
xross.errors.XrossError: the configuration: sandwich applies to mutualnet, not dml: drop --sandwich (it applies ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from pydantic_core import to_jsonable_python

from surgery.core.registry import Registry
from xross.errors import XrossError

USES = "uses"  # the json_schema_extra key of a field's declaration


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method, registered once in :data:`METHODS` next to its implementation.

    Args:
        name: the ``--mode`` (``train``) or the command (``distill``) that selects it.
        help: one line for ``--help`` and the docs.
        engine: the :class:`xross.run.engine.RunEngine` subclass that trains it, called as
            ``engine(config, resume=..., force=..., progress=..., trust_code=..., ...)``.
        kind: the :class:`RunKind` its runs are (``"cohort"``, ``"slim"``, ``"student"``).
        command: the config it is chosen from: ``"train"`` (:class:`~xross.run.config.TrainConfig`'s
            ``mode``) or ``"distill"``.
        objective: for a cohort method, the factory of its :class:`xross.methods.objectives.Mode`,
            called with ``label_smoothing`` and the fields declared ``uses(..., objective=ARG)`` for it.
        needs_teacher: the engine loads ``--teacher`` models (and the config refuses a run without one).
        unlabelled: its loss learns from unlabelled images (else the cohort trainer drops them).
        check: the method's own consistency checks of a config (raise ``ValueError`` with one line).
        why_not: a reason, per field, why the method has no use for it (said before the generic refusal).
        uses: fields declared on the config that this method (registered outside xross) uses besides
            those whose declaration names it.
    """

    name: str
    help: str
    engine: Callable[..., Any]
    kind: str
    command: Literal["train", "distill"] = "train"
    objective: Callable[..., Any] | None = None
    needs_teacher: bool = False
    unlabelled: bool = True
    check: Callable[[Any], None] | None = None
    why_not: Mapping[str, str] = dataclasses.field(default_factory=dict)
    uses: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ExportChoice:
    """What ``xross export`` was asked for (None: not given): a cohort's path, a slim run's width and resolution."""

    path: str | None = None
    width: float | None = None
    resolution: int | None = None


@dataclasses.dataclass(frozen=True)
class ResultTable:
    """One table of a run's results for the command line: title, columns, rows; ``flops_on`` (the input the
    FLOPs column is counted on) when it has one; ``after``: a line printed below it."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    flops_on: Any = None
    after: str | None = None


@dataclasses.dataclass(frozen=True)
class RunKind:
    """What a finished run of one kind is and how the commands that read runs treat it.

    Args:
        name: ``cohort``, ``slim``, ``student``...
        title: how messages call such a run (``"mutualnet run"``).
        holds: what it holds, for messages (``"one net at many widths"``).
        load: ``load(run, *, trust_code, verify) -> (config, model)`` with the newest good weights.
        evaluate: ``evaluate(run, config, model, batches, *, trust_code, verify, progress) -> EvalResult``
            (``xross eval``); ``batches()`` decodes the evaluation batches (after the kind loaded what it needs);
            ``progress(name)``, if given, is told of each network as it is evaluated.
        export: ``export(run, choice, *, trust_code, verify, prepare) -> (module, description)`` for ``xross
            export``; ``choice`` is an :class:`ExportChoice`; refuses what does not apply to the kind in one
            line, and calls ``prepare()`` (the output directory) before it loads or writes anything big.
        profile: ``profile(config, model, batch, repeats) -> {name: LatencyEntry}`` (``xross profile``).
        show: ``show(config, result, run) -> [ResultTable]``: how ``xross eval`` and ``xross train`` print it.
        flops_on: ``flops_on(config)``: the input its FLOPs are counted on (a list of input specs or a text).
        teacher: ``teacher(reference, run, which, *, trust_code, verify) -> (module, paths, names)``: the run as
            a teacher (:mod:`xross.run.teachers`): a cohort and the paths ``which`` selects, or a network and
            None; one name per teacher.
    """

    name: str
    title: str
    holds: str
    load: Callable[..., tuple[Any, Any]]
    evaluate: Callable[..., Any]
    export: Callable[..., tuple[Any, str]]
    profile: Callable[..., dict[str, Any]]
    show: Callable[..., list[ResultTable]]
    flops_on: Callable[[Any], Any]
    teacher: Callable[..., tuple[Any, Any, list[str]]]


METHODS: Registry[Method] = Registry("method", error=XrossError)
KINDS: Registry[RunKind] = Registry("run kind", error=XrossError)


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the table (a test's toy method too; :meth:`Registry.unregister` removes it)."""
    return METHODS.register(method.name, method, replace=replace)


def register_kind(kind: RunKind, *, replace: bool = False) -> RunKind:
    """Add a kind of run to the table."""
    return KINDS.register(kind.name, kind, replace=replace)


def method_of(config: Any) -> Method:
    """The method a config trains (its ``method``: ``mode`` for a train run, ``distill`` for a distillation)."""
    return METHODS.get(config.method)


def kind_of(config: Any) -> RunKind:
    """The kind of run a config makes."""
    return KINDS.get(method_of(config).kind)


def require_kind(config: Any, name: str, run: Any, *, prefix: str = "", fix: str = "") -> None:
    """Refuse, in one line, a run whose kind is not ``name`` (``load_run`` on a distillation, say)."""
    have, want = kind_of(config), KINDS.get(name)
    if have is not want:
        raise XrossError(f"{prefix}'{run}' is a {have.title}: {have.holds}, not {want.holds}{fix}")


def command_methods(command: str) -> list[str]:
    """The names of the methods a command chooses from (``train``: the ``--mode`` values), in table order."""
    return [name for name, m in METHODS.items() if m.command == command]


# --- which fields apply to which method: declared once, on the fields -----------------------------


def uses(*methods: str, kinds: tuple[str, ...] = (), objective: str | None = None) -> dict[str, Any]:
    """A field's ``json_schema_extra`` (merge it with other hints): the field applies to ``methods`` and to
    every method of ``kinds`` only; ``objective`` names the argument of the methods' objective it is passed
    as (None: the engine reads it from the config)."""
    return {USES: {"methods": methods, "kinds": kinds, "objective": objective}}


def declaration(field: Any) -> dict[str, Any] | None:
    """A field's :func:`uses` declaration, None for a field every method uses."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    found = extra.get(USES)
    return found if isinstance(found, dict) else None


def applies(field_name: str, field: Any, method: Method) -> bool:
    """Whether ``method`` uses the field (general fields: always)."""
    spec = declaration(field)
    if spec is None or field_name in method.uses:
        return True
    return method.name in spec["methods"] or method.kind in spec["kinds"]


def users(field_name: str, field: Any, command: str) -> list[str]:
    """The methods of ``command`` that use the field, in table order."""
    return [name for name in command_methods(command) if applies(field_name, field, METHODS.get(name))]


def _and(names: list[str], word: str) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {word} {names[-1]}"


def _unused_fields(config_class: Any, method: Method) -> Iterator[tuple[str, Any]]:
    """``(name, field)`` of each field of ``config_class`` that ``method`` does not use."""
    return ((n, f) for n, f in config_class.model_fields.items() if not applies(n, f, method))


def unused_option(config: Any) -> str | None:
    """The one-line refusal of the first field ``config`` sets (to a value other than its default) that its
    method does not use, naming the option and the methods that use it; None when there is none."""
    method = method_of(config)
    for name, field in _unused_fields(type(config), method):
        if getattr(config, name) == field.get_default(call_default_factory=True):
            continue
        flag = "--" + name.replace("_", "-")
        who = users(name, field, method.command) or ["no method of this command"]
        reason = f"{method.why_not[name]}; " if name in method.why_not else ""
        return (
            f"{reason}{name} applies to {_and(who, 'and')}, not {method.name}: drop {flag} "
            f"(it applies to --mode {_and(who, 'or')} only)"
        )
    return None


def saved_without_unused_options(config_class: Any, data: Any, where: str) -> tuple[Any, list[str]]:
    """A run's saved config less the options its method never used, and a note naming each one dropped.

    Runs written before options were checked against the method may hold one (``mode: dml`` with
    ``kd_alpha: 0.9``); the run trained without it, so reading the run without it keeps what the
    user has readable and exact. Files written since cannot hold one: it is refused when given.
    """
    if not isinstance(data, dict):
        return data, []
    known = {k: v for k, v in data.items() if k in config_class.model_fields}
    method = METHODS.find(config_class.model_construct(**known).method)
    if method is None:
        return data, []  # the validation names the unknown method
    kept, notes = dict(data), []
    for field_name, field in _unused_fields(config_class, method):
        if field_name in kept:
            value = kept.pop(field_name)
            if value != to_jsonable_python(field.get_default(call_default_factory=True)):
                notes.append(
                    f"{where}: {field_name} {value!r} was never used by {method.name}; "
                    "read as not given, as when the run trained"
                )
    return kept, notes


def objective_options(config: Any, method: Method) -> dict[str, Any]:
    """The keyword arguments of ``method``'s objective: ``label_smoothing`` and each field declared
    ``uses(..., objective=ARG)`` that the method uses, as ``ARG``."""
    options: dict[str, Any] = {"label_smoothing": config.label_smoothing}
    for name, field in type(config).model_fields.items():
        spec = declaration(field)
        if spec is not None and spec["objective"] and applies(name, field, method):
            options[spec["objective"]] = getattr(config, name)
    return options


def help_suffix(field_name: str, field: Any) -> str:
    """What a field's ``--help`` adds from its declaration: which methods or kinds of run use it."""
    spec = declaration(field)
    if spec is None:
        return ""
    who = [*spec["methods"], *(f"{k} methods" for k in spec["kinds"])]
    return f" (used by {_and(who, 'and')})"
