"""growth.branch (net2branch): where no padding keeps the size, the refusal suggests a kernel size that does."""

from __future__ import annotations

import pytest

import growth
import surgery
from growth.errors import GrowthError


def test_branch_padding_suggests_a_kernel() -> None:
    net = surgery.build_model("convnext_tiny").eval()
    with pytest.raises(GrowthError, match="try kernel_size=2"):
        growth.net2branch(net, "features.2.1")
