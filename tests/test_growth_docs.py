"""The runnable examples in the growth and channel-analysis docstrings stay true."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "surgery.channels", "surgery.permute", "growth", "growth.wider", "growth.deeper", "growth.branch", "growth.kernel",
    "growth.skip", "growth.signs", "growth.graphedit", "growth.check", "growth.registry", "growth.mutation",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
