"""Root fixtures, for the doctests in the packages as much as for tests/.

Docstring examples make scratch folders with ``tempfile.mkdtemp()`` (what a reader would
write); during the test run those land in the example's own ``tmp_path``, which pytest
removes when the example passes (``tmp_path_retention_policy = "failed"`` in
pyproject.toml), so a run leaves no checkpoints behind on the machine's disk.
"""

from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(autouse=True)
def _doctest_scratch_in_tmp_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.setattr(tempfile, "tempdir", str(request.getfixturevalue("tmp_path")))
