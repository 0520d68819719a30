"""The torch.export front-end: capture what torch.fx cannot trace (Hugging Face transformers, say).

``torch.export.export(model, args, kwargs, strict=False)`` records the model's aten ops
on an example input, with every dimension free to vary where the model allows it
(``Dim.AUTO``; of an image, its batch), so the graph accepts other batch sizes and
sequence lengths; a note names each dimension export had to fix, and pieces called
on sizes their graph does not take capture again for them (:mod:`surgery.pieces.recut`). Each node
keeps the module path it was computed in (``meta['nn_module_stack']``), so module-path
cut names mean what they mean under fx. Two adjustments make the graph behave like the
model it came from:

* dropout follows ``train()``/``eval()``: each ``aten.dropout`` call becomes a call of an
  ``nn.Dropout`` module (export freezes the training flag of the mode it ran in);
* key-value caches are off (``config.use_cache = False`` during capture): a cache
  object is not a tensor a piece can hand on. A note says so when the model had it on.

BatchNorm in an exported graph uses its running statistics in both modes (CNNs are
captured by fx, where BatchNorm stays a module).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from surgery.core.errors import SurgeryError
from surgery.core.util import evaluating, first_line
from surgery.graph.inputs import Example

STACK = "nn_module_stack"
DROPOUT_PREFIX = "surgery_dropout_"


@contextlib.contextmanager
def _cache_off(model: nn.Module, notes: list[str]) -> Iterator[None]:
    config: Any = getattr(model, "config", None)  # a Hugging Face config, when there is one
    had = getattr(config, "use_cache", None)
    if had:
        config.use_cache = False
        generates = getattr(model, "can_generate", None)
        if callable(generates) and generates():  # only models that would hand a cache back need telling
            notes.append(f"{type(model).__name__}: key-value cache off in the captured graph (use_cache=False)")
    try:
        yield
    finally:
        if had:
            config.use_cache = had


def free_dims(value: torch.Tensor) -> range:
    """The dimensions of an input captured free: all of them, but only the batch of an image or feature map.

    Free image sides cost torch.export minutes of symbolic reasoning on windowed models
    (HF Swin: 140 s against 4 s with only the batch free); pieces called on another
    image size capture again for it (:mod:`surgery.pieces.recut`).
    """
    return range(1) if value.is_floating_point() and value.dim() >= 3 else range(value.dim())


def dynamic_shapes(example: Example) -> tuple[Any, ...] | dict[str, Any] | None:
    """The dimensions :func:`free_dims` names free (``Dim.AUTO``); export keeps fixed what the model fixes."""

    def dims(value: Any) -> Any:
        return {i: Dim.AUTO for i in free_dims(value)} if isinstance(value, torch.Tensor) else None

    if example.kwargs and not example.args:
        return {k: dims(v) for k, v in example.kwargs.items()}
    if example.args and not example.kwargs:
        return tuple(dims(a) for a in example.args)
    return None  # mixed positional and keyword inputs: shapes as given


_CHATTY_LOGGERS = ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo")


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.export's own log lines (specialised dims, guards) are not for users: errors only, restored after."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _batch_of_two(example: Example) -> Example:
    """The example with a batch of 1 repeated to 2: export would fix a dimension of size 1 to 1 for good."""

    def two(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
            return torch.cat([value, value])
        return value

    return Example(tuple(two(a) for a in example.args), {k: two(v) for k, v in example.kwargs.items()})


def export_graph(model: nn.Module, example: Example, dynamic: bool = True) -> tuple[fx.GraphModule, list[str], Example]:
    """``model`` captured by torch.export on ``example``: a GraphModule sharing its parameters, notes, the input.

    ``dynamic``: every dimension free where the model allows it (a batch of 1 is made 2
    first, the input returned), else every size fixed at the example's. A note names
    each dimension export had to fix (:func:`fixed_dims`). Raises a one-line
    :class:`SurgeryError` when torch.export cannot capture it either.
    """
    notes: list[str] = []
    example = _batch_of_two(example) if dynamic else example
    shapes = dynamic_shapes(example) if dynamic else None
    try:
        with _cache_off(model, notes), evaluating(model, grad=True), warnings.catch_warnings(), _quiet_torch():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, example.args, example.kwargs, dynamic_shapes=shapes, strict=False)
            gm = program.module()
    except Exception as e:  # noqa: BLE001 - export raises whatever the model's code raises
        raise SurgeryError(f"torch.export cannot capture {type(model).__name__} either: {first_line(e)}") from None
    fixed = fixed_dims(gm) if shapes is not None else []
    if fixed:
        notes.append(
            f"{type(model).__name__}: torch.export fixed {', '.join(fixed)} (the model's code needs it there); "
            "the pieces capture again for each other size they are called with"
        )
    _dropout_as_modules(gm)
    return gm, notes, example


def fixed_dims(gm: fx.GraphModule) -> list[str]:
    """``"input_ids dim 1 = 12"`` for each dimension captured free (:func:`free_dims`) that the graph holds fixed."""
    out = []
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            out += [
                f"{node.name} dim {d} = {value.shape[d]}" for d in free_dims(value) if is_concrete_int(value.shape[d])
            ]
    return out


def _dropout_as_modules(gm: fx.GraphModule) -> None:
    """Replace each ``aten.dropout(x, p, train)`` by a call of an ``nn.Dropout(p)``, which follows train()/eval().

    The modules sit at the top level (``surgery_dropout_<k>``), outside the model's own
    module tree, so that tree can be put back over the graph (:func:`surgery.graph.capture.trace`).
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.dropout.default:
            continue
        path = f"{DROPOUT_PREFIX}{count}"
        count += 1
        gm.add_submodule(path, nn.Dropout(float(node.args[1])))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    if count:
        gm.recompile()
