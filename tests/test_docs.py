"""The runnable examples in the surgery and xross docstrings stay true."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "surgery", "surgery.tracing", "surgery.cut", "surgery.cutpoints", "surgery.adapters", "surgery.matching",
    "surgery.replace", "surgery.io", "surgery.models", "surgery.render", "xross.cohort", "xross.evaluate", "xross.optim",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
