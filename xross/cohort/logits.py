"""A network's output as logits: the one place where xross turns what a model returns into a tensor.

Teachers, students and the last part of a cohort's nets may be models whose ``forward``
returns more than a tensor: a Hugging Face classifier's ``ModelOutput`` (``.logits``), a
tuple whose first element is the logits (``return_dict=False``, torchvision's GoogLeNet and
Inception in training mode with their auxiliary outputs). :func:`as_logits` takes each of
them; anything else is refused in one line.

>>> import torch
>>> from transformers.modeling_outputs import ImageClassifierOutput
>>> logits = torch.ones(2, 10)
>>> all(as_logits(out) is logits for out in (logits, ImageClassifierOutput(logits=logits), (logits, None)))
True
>>> as_logits({"features": logits}, "teacher 'hf:vit'")
Traceback (most recent call last):
...
xross.errors.XrossError: teacher 'hf:vit' returns a dict (keys: features), not logits; give a model that returns a \
tensor of logits, an output with .logits (a Hugging Face ModelOutput) or a tuple whose first element is the logits
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from xross.errors import XrossError

__all__ = ["as_logits"]


def as_logits(output: Any, what: str = "the model") -> torch.Tensor:
    """The logits in ``output``: the tensor itself, its ``.logits`` (or ``["logits"]``), or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if isinstance(logits, torch.Tensor):
        return logits
    raise XrossError(
        f"{what} returns {_described(output)}, not logits; give a model that returns a tensor of logits, an output "
        "with .logits (a Hugging Face ModelOutput) or a tuple whose first element is the logits"
    )


def _described(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} (keys: {', '.join(map(str, output))})"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)} starting with {type(output[0]).__name__ if output else '-'}"
    return f"a {type(output).__name__}"
