"""surgery.pieces.render: pieces drawn as graphviz DOT, and as SVG where graphviz's ``dot`` binary is installed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import surgery


def test_render_dot_and_svg(tmp_path: Path, r18: torch.nn.Module) -> None:
    pieces = surgery.cut(r18, "layer2", torch.randn(1, 3, 32, 32))
    dot = surgery.render(pieces, tmp_path / "g.dot").read_text()
    assert "cluster_0" in dot and "cluster_1" in dot and "128x4x4" in dot
    if shutil.which("dot"):
        assert surgery.render(pieces, tmp_path / "g.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    else:
        with pytest.raises(surgery.SurgeryError, match="graphviz 'dot' binary"):
            surgery.render(pieces, tmp_path / "g.svg")
