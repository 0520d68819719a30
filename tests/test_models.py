"""surgery.models.build: an unknown model name is refused in one line that lists the closest known names."""

from __future__ import annotations

import pytest

import surgery


def test_unknown_model_lists_closest() -> None:
    with pytest.raises(surgery.SurgeryError, match="closest: resnet18"):
        surgery.build_model("resnet81")
