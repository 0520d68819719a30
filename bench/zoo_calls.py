"""The two call columns of ``bench/transformers_zoo.py``: pieces called the way users call the model.

"called like the model": cut with no example (the library guesses one), then call the pieces
on the model's own input the minimal way, ``pieces(x)`` with the main input alone
(positional), and with every input by keyword where the model takes several; each must equal
the model called the same way. "other length": the same pieces, called both ways, at other
batch sizes and lengths; a size the model itself refuses is noted and skipped (no miss of the
pieces). A value reads "yes" (bit for bit), "close" (within :data:`TOLERANCE` x max |y|) or
"NO", followed by the sizes called; every miss comes back as a note with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import surgery
from surgery.graph.inputs import Example, default_example

TOLERANCE = 1e-5
Call = tuple[str, tuple[Any, ...], dict[str, Any]]


@dataclass
class Calls:
    called: str = "-"
    other: str = "-"
    notes: list[str] = field(default_factory=list)


def first_tensor(value: Any) -> torch.Tensor:
    """The tensor a model's output leads with (``logits``, ``last_hidden_state`` or its first item)."""
    if isinstance(value, torch.Tensor):
        return value
    for key in ("logits", "last_hidden_state"):
        if getattr(value, key, None) is not None:
            return getattr(value, key)
    return value[0]


def error_line(e: Exception) -> str:
    """``Type: first line of the message`` (at most 160 characters of it)."""
    message = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {message}"


def _main_input(example: Example) -> torch.Tensor:
    """The model's main input: its first positional input, else its first keyword input."""
    return example.args[0] if example.args else next(iter(example.kwargs.values()))


def _calls(example: Example) -> list[Call]:
    """How users call the model on ``example``: the main input alone, positionally; every input by keyword."""
    calls: list[Call] = [("pieces(x)", (_main_input(example),), {})]
    if len(example.kwargs) > 1:
        calls.append((f"pieces({'=, '.join(example.kwargs)}=)", (), dict(example.kwargs)))
    return calls


def _size(example: Example) -> str:
    return "x".join(map(str, _main_input(example).shape))


def _verdict(got: Any, want: Any) -> tuple[str, str]:
    """``("yes", "")`` when equal bit for bit, ``("close", why)`` within the tolerance, else ``("NO", why)``."""
    got, want = first_tensor(got), first_tensor(want)
    if got.shape != want.shape:
        return "NO", f"output shape {tuple(got.shape)}, the model's {tuple(want.shape)}"
    if torch.equal(got, want):
        return "yes", ""
    change = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    return ("close" if change <= TOLERANCE else "NO"), f"differs by {change:.1e} of max |y|"


@torch.no_grad()
def compare(model: torch.nn.Module, pieces: torch.nn.Module, examples: list[Example], column: str) -> Calls:
    """Call the model and the pieces each way users do on each example: the column's value and its notes."""
    verdicts, notes, sizes = [], [], []
    for example in examples:
        for form, args, kwargs in _calls(example):
            try:
                want = model(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a size the model refuses is no miss of the pieces
                notes.append(f"{column}: (the model itself refuses {_size(example)}: {error_line(e)})")
                break
            try:
                verdict, why = _verdict(pieces(*args, **kwargs), want)
            except Exception as e:  # noqa: BLE001 - a bench records failures instead of stopping
                verdict, why = "NO", error_line(e)
            verdicts.append(verdict)
            if why:
                notes.append(f"{column}: {form} on {_size(example)}: {why}")
        else:
            sizes.append(_size(example))
    value = "NO" if "NO" in verdicts else "close" if "close" in verdicts else "yes"
    return Calls(called=f"{value} ({', '.join(sizes)})" if verdicts else "-", notes=notes)


def _guess_note(model: torch.nn.Module) -> list[str]:
    """A note when the library guesses no input, or one the model itself refuses."""
    try:
        guess = default_example(model)
    except Exception as e:  # noqa: BLE001
        return [f"called like: (no input guessed: {error_line(e)})"]
    try:
        with torch.no_grad():
            guess(model)
    except Exception as e:  # noqa: BLE001
        return [f"called like: (the model itself refuses the guess {guess.describe()}: {error_line(e)})"]
    return []


def called_like_the_model(
    model: torch.nn.Module, cuts: list[str], own: Example, others: list[Example], fallback: torch.nn.Module
) -> Calls:
    """Both columns: cut ``model`` at ``cuts`` with no example, call the pieces on ``own``, then on ``others``.

    ``fallback`` (the pieces of a cut with an example) is called on ``others`` when the cut
    without an example fails; the "other length" value then says so.
    """
    torch.manual_seed(1)
    result = Calls(notes=_guess_note(model))
    try:
        guessed = surgery.cut(model, cuts)
    except Exception as e:  # noqa: BLE001
        result.called, guessed = "NO", None
        result.notes.append(f"called like: the cut with no example failed: {error_line(e)}")
    else:
        first = compare(model, guessed, [own], "called like")
        result.called = first.called
        result.notes += first.notes
    torch.manual_seed(2)
    other = compare(model, guessed if guessed is not None else fallback, others, "other length")
    result.other = other.called if guessed is not None else f"{other.called} (example's cut)"
    result.notes += other.notes
    return result
