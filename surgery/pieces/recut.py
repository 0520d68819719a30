"""Pieces called with other inputs than their graph takes: cut the model again for that call, and keep it.

A captured graph is one way of calling the model: torch.export records the inputs of
its example and the branches they take (``attention_mask`` given or not), fx fixes
each optional argument at its default (:func:`surgery.graph.fx.optional_defaults`).
Called another way (``pieces(input_ids)`` after a cut on ``input_ids`` and
``attention_mask``, or with a mask after a cut without one), :class:`Pieces` cuts
the model again at the same names for that call's inputs (tensors by name, other
values as given), keeps that cut per call signature, and runs it; the re-cut pieces
read the pieces' own parameters and buffers, so the result is what the model
returns for the same call. ``pieces[k]`` keeps the graph of the original cut.

>>> import torch, transformers, surgery
>>> transformers.logging.set_verbosity_error()
>>> cfg = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 50, "n_positions": 32}
>>> gpt2 = surgery.build_model("hf:GPT2LMHeadModel", config=cfg).eval()
>>> pieces = surgery.cut(gpt2, "transformer.h.0")  # the guessed input: input_ids alone
>>> ids, mask = torch.randint(1, 50, (2, 9)), torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
>>> torch.equal(pieces(ids).logits, gpt2(ids).logits)
True
>>> torch.equal(pieces(ids, attention_mask=mask).logits, gpt2(ids, attention_mask=mask).logits)
True
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from surgery.core.errors import SurgeryError
from surgery.core.util import first_line
from surgery.graph.fx import LeafSpec, optional_defaults
from surgery.graph.inputs import Example

if TYPE_CHECKING:
    from surgery.graph.capture import Capture

Pieces = Any  # a surgery.pieces.cut.Pieces: that module imports this one


RECUT_KEY = "surgery_recut"
MAX_CUTS = 16  # cuts kept per Pieces (one per call signature or shape); the least recently used goes first
CallKey = tuple[tuple[str, str], ...]


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _at_default(value: Any, param: inspect.Parameter | None) -> bool:
    """Whether ``value`` is what the model would use without it (None, or its constant default)."""
    if value is None:
        return True
    default = param.default if param is not None else inspect.Parameter.empty
    return type(value) is type(default) and not isinstance(value, torch.Tensor) and value == default


def _describe(call: dict[str, Any]) -> str:
    return ", ".join(n if isinstance(v, torch.Tensor) else f"{n}={v!r}" for n, v in call.items()) or "nothing"


@dataclasses.dataclass(eq=False)
class Recut:
    """How pieces were cut (model, names, front-end) and the call their graph takes; cuts again for other calls."""

    model: nn.Module
    names: tuple[str, ...]
    leaf_modules: tuple[LeafSpec, ...]
    tracer: str  # the front-end to capture with: "auto", "fx" or "export", as the cut was asked
    taken: dict[str, Any]  # the call the captured graph computes: tensors and fixed values by parameter name
    by_keyword: bool  # torch.export's pieces take the call by keyword; fx's by position (it renames fixed ones)
    cutter: Callable[..., Pieces]  # surgery.pieces.cut.cut (which imports this module)
    cache: dict[CallKey, Pieces] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        cap: Capture,
        tracer: str,
        names: Sequence[str],
        leaf_modules: Sequence[LeafSpec],
        cutter: Callable[..., Pieces],
    ) -> Recut | None:
        """The re-cutter of a capture (None for a GraphModule used as is, or a model whose call cannot be bound)."""
        sig, example = _signature(model), cap.example
        if cap.tracer not in ("fx", "export") or sig is None:
            return None
        if cap.tracer == "export":
            try:
                taken = _bind(sig, example.args, example.kwargs) if example is not None else None
            except TypeError:
                return None
        else:
            fixed = optional_defaults(model)
            taken = {p: torch.empty(0) for p in sig.parameters if p not in fixed and _plain(sig.parameters[p])}
        if taken is None:
            return None
        return cls(model, tuple(names), tuple(leaf_modules), tracer, _given(sig, taken), cap.tracer == "export", cutter)

    def run(self, pieces: Pieces, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``pieces(*args, **kwargs)``: on their own graph when it takes this call, else on a cut for it.

        A graph whose shape guards refuse the call's sizes (torch.export fixed a length, or
        assumed a size is not 1) is captured again for exactly those sizes.
        """
        sig = _signature(self.model)
        try:
            call = _bind(sig, args, kwargs) if sig is not None else None
        except TypeError as e:
            raise SurgeryError(
                f"the pieces take ({_describe(self.taken)}) as the model does: {first_line(e)}"
            ) from None
        if sig is None or call is None:
            return pieces.run(*args, **kwargs)
        call = _given(sig, call)
        own = _key(call) == _key(self.taken)
        try:
            return pieces.run(*args, **kwargs) if own else self._run_on(pieces, call, sig, False)
        except (AssertionError, RuntimeError) as e:
            if not _guard_failed(e):
                raise
            return self._run_on(pieces, call, sig, True)

    def _run_on(self, pieces: Pieces, call: dict[str, Any], sig: inspect.Signature, fixed: bool) -> Any:
        other = self._pieces_for(call, sig, fixed)[: len(pieces)]
        _share_tensors(pieces, other)
        other.train(pieces.training)
        return other.run(**call) if self.by_keyword else other.run(*_positional(sig, call))

    def _pieces_for(self, call: dict[str, Any], sig: inspect.Signature, fixed: bool) -> Pieces:
        key = _key(call) + (tuple(_shapes(call)) if fixed else ())
        if key not in self.cache:
            example = Example((), call) if self.by_keyword else Example(tuple(_positional(sig, call)), {})
            concrete = {n: fx.PH if isinstance(v, torch.Tensor) else v for n, v in call.items()}  # fx: the rest fixed
            if fixed:
                warnings.warn(
                    f"{type(self.model).__name__}: the captured graph does not take inputs of sizes "
                    f"{_describe_sizes(call)}; capturing again for those sizes (one graph per shape)",
                    stacklevel=4,
                )
            try:
                with warnings.catch_warnings():  # the capture's notes were given at the first cut
                    warnings.simplefilter("ignore")
                    self.cache[key] = self.cutter(
                        self.model, list(self.names), example, leaf_modules=self.leaf_modules, tracer=self.tracer,
                        concrete_args=concrete, dynamic=not fixed,
                    )  # fmt: skip
            except SurgeryError as e:
                raise SurgeryError(
                    f"the pieces take ({_describe(self.taken)}); called with ({_describe(call)}), cutting again "
                    f"for that call failed: {first_line(e)}"
                ) from None
        self.cache[key] = self.cache.pop(key)  # most recently used last
        while len(self.cache) > MAX_CUTS:
            del self.cache[next(iter(self.cache))]
        return self.cache[key]


_GUARDS = ("Guard failed", "Runtime assertion failed for expression")


def _guard_failed(error: BaseException) -> bool:
    """Whether ``error`` is an exported graph's shape guard refusing its input (not the model's own error)."""
    return any(g in first_line(error) for g in _GUARDS)


def _shapes(call: dict[str, Any]) -> list[tuple[str, str]]:
    return [(n, "x".join(map(str, v.shape))) for n, v in call.items() if isinstance(v, torch.Tensor)]


def _describe_sizes(call: dict[str, Any]) -> str:
    return ", ".join(f"{n}={s}" for n, s in _shapes(call))


def _plain(param: inspect.Parameter) -> bool:
    return param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY, param.POSITIONAL_ONLY)


def _bind(sig: inspect.Signature, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The call's values by the model's parameter names (``**kwargs`` flattened); None for unnamed ``*args``.

    Raises ``TypeError`` when the model itself would refuse the call.
    """
    bound = sig.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None  # inputs without names: nothing to capture them by
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _given(sig: inspect.Signature, call: dict[str, Any]) -> dict[str, Any]:
    """The values of a call that change what the model computes (not None, not its default)."""
    return {n: v for n, v in call.items() if not _at_default(v, sig.parameters.get(n))}


def _key(call: dict[str, Any]) -> CallKey:
    return tuple(sorted((n, "tensor" if isinstance(v, torch.Tensor) else repr(v)) for n, v in call.items()))


def _positional(sig: inspect.Signature, call: dict[str, Any]) -> list[Any]:
    """A call as positional values in the model's parameter order (fx renames the placeholders it fixes)."""
    params = [p for p in sig.parameters.values() if _plain(p)]
    return [call.get(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params]


def _share_tensors(source: Pieces, target: Pieces) -> None:
    """Make ``target``'s pieces read the very parameters and buffers ``source``'s pieces hold at the same paths."""
    own: dict[str, torch.Tensor] = {}
    for piece in source:
        own.update(piece.named_parameters(remove_duplicate=False))
        own.update(piece.named_buffers(remove_duplicate=False))
    for piece in target:
        for path, module in piece.named_modules(remove_duplicate=False):
            prefix = f"{path}." if path else ""
            for table in (module._parameters, module._buffers):
                for name, value in table.items():
                    mine = own.get(prefix + name)
                    if mine is not None and mine is not value:
                        table[name] = mine


def recut_of(parts: Sequence[nn.Module]) -> Recut | None:
    """The re-cutter of ``parts`` when they are the first pieces of one cut, in order (else None).

    Each piece of a cut carries ``meta[RECUT_KEY] = (recut, index)``.
    """
    marks = [getattr(p, "meta", {}).get(RECUT_KEY) for p in parts]
    found = [m for m in marks if m is not None]
    if len(found) < len(marks) or any(m[0] is not found[0][0] or m[1] != i for i, m in enumerate(found)):
        return None
    return found[0][0]
