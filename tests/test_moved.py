"""surgery.core.moved: files written before the packages were split into rooms still load, bit for bit."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import torch

import surgery
from surgery.core.moved import MOVED


def test_every_moved_module_is_where_the_table_says_and_gone_from_where_it_was() -> None:
    for old, new in MOVED.items():
        assert importlib.import_module(new).__name__ == new
        parent, _, leaf = old.rpartition(".")
        spec = importlib.util.find_spec(parent)
        assert spec is not None and spec.submodule_search_locations is not None
        # the old name is no module file any more (it may be a package of the same name, the room)
        assert not any((Path(p) / f"{leaf}.py").exists() for p in spec.submodule_search_locations), old


def test_a_stitched_model_saved_with_the_old_module_names_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = surgery.build_model("resnet18", num_classes=10).eval()
    b = surgery.build_model("resnet34", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    up = surgery.cut(a, "layer2", example_input=x)[0]
    down = surgery.cut(b, "layer1", example_input=x)[1:]  # 128 channels in, 64 expected: an adapter between
    stitched = surgery.stitch(up, down, x)
    out = surgery.save(stitched, tmp_path / "stitched")
    recipe_file = out / "recipe.json"
    text = recipe_file.read_text()
    new_names = sorted({new for new in MOVED.values() if f'"{new}:' in text or f"'{new}:" in text})
    assert new_names, "the recipe records no class of a moved module: the test would prove nothing"
    for old, new in MOVED.items():  # write the file as the library wrote it before the move
        text = text.replace(f'"{new}:', f'"{old}:')
    assert json.loads(text) != json.loads(recipe_file.read_text())
    recipe_file.write_text(text)
    loaded = surgery.load(out)
    assert torch.equal(loaded(x), stitched(x))
