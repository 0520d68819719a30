"""The public API as a newcomer meets it: every export shows a runnable example, one name per idea, no shadowing.

* every callable and class in ``__all__`` of surgery, growth and xross carries a ``>>>``
  example in its own docstring, one the doctest run collects (so it runs in ``make test``);
* no package or subpackage binds a function or class under the name of one of its
  submodules (``surgery.cut`` the function used to hide ``surgery/cut.py``);
* the renamed arguments (``export(example=)`` -> ``example_input=``, ``net2deeper(after=)``
  -> ``at=``, ``growth mutate --after`` -> ``--at``) still work with a ``FutureWarning``
  naming the new name, and a recipe saved with ``after`` still loads.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import json
import pkgutil
import types
from pathlib import Path

import pytest
import torch

import growth
import surgery
import xross
from growth.errors import GrowthError

PACKAGES = (surgery, growth, xross)


def _vgg() -> torch.nn.Module:
    """A small VGG for 32x32 images (a size growth and the channel analysis guess without an example)."""
    return surgery.build_model("growth.models:small_vgg", widths=[4, 8], num_classes=10, image_size=32).eval()


def _exports() -> list[tuple[str, object]]:
    """``(qualified name, object)`` for every callable or class a package exports (modules and tables left out)."""
    found = []
    for package in PACKAGES:
        for name in package.__all__:
            obj = getattr(package, name)
            if not isinstance(obj, types.ModuleType) and callable(obj):
                found.append((f"{package.__name__}.{name}", obj))
    return found


def _collected_examples(obj: object) -> int:
    """How many ``>>>`` examples the doctest run collects from ``obj``'s own docstring (in the module defining it)."""
    module = inspect.getmodule(obj)
    assert module is not None, obj
    own = f"{module.__name__}.{getattr(obj, '__qualname__', '')}"
    tests = doctest.DocTestFinder().find(module)
    return sum(len(t.examples) for t in tests if t.name == own)


@pytest.mark.parametrize(("name", "obj"), _exports(), ids=[n for n, _ in _exports()])
def test_every_export_has_a_runnable_example_in_its_own_docstring(name: str, obj: object) -> None:
    assert ">>>" in (inspect.getdoc(obj) or ""), f"{name}: no >>> example in its docstring"
    assert _collected_examples(obj) > 0, f"{name}: its example is not collected by the doctest run"


def _packages() -> list[types.ModuleType]:
    found = []
    for package in PACKAGES:
        found.append(package)
        walk = pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        found += [importlib.import_module(m.name) for m in walk if m.ispkg]
    return found


@pytest.mark.parametrize("package", _packages(), ids=lambda p: p.__name__)
def test_no_function_or_class_shadows_a_submodule(package: types.ModuleType) -> None:
    assert package.__file__ is not None, package
    submodules = {m.name for m in pkgutil.iter_modules([str(Path(package.__file__).parent)])}
    shadowing = [
        name
        for name, value in vars(package).items()
        if (inspect.isfunction(value) or inspect.isclass(value)) and name in submodules
    ]
    assert not shadowing, f"{package.__name__} binds {shadowing}, names of its own submodules"
    assert submodules, package  # the walk saw its files


def test_export_takes_example_input_and_its_former_name_with_a_warning(tmp_path: Path) -> None:
    net = _vgg()
    pieces = surgery.cut(net, "features.0")
    x = torch.randn(2, 3, 32, 32)
    new = surgery.export(pieces, tmp_path / "new", "pt2", example_input=x)
    with pytest.warns(FutureWarning, match=r"export\(example=\.\.\.\) is now export\(example_input=\.\.\.\)"):
        old = surgery.export(pieces, tmp_path / "old", "pt2", example=x)
    assert (
        json.loads((new / "pieces.json").read_text())["pieces"]
        == json.loads((old / "pieces.json").read_text())["pieces"]
    )
    with pytest.raises(surgery.SurgeryError, match=r"got both example_input= and its former name example=; give"):
        surgery.export(pieces, tmp_path / "both", "pt2", example_input=x, example=x)
    assert not (tmp_path / "both").exists()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_net2deeper_takes_at_like_the_other_ops_and_after_with_a_warning() -> None:
    net = _vgg()
    site = growth.sites(net, "net2deeper", kind="conv")[0]
    new = growth.net2deeper(net, at=site)
    with pytest.warns(FutureWarning, match=r"net2deeper\(after=\.\.\.\) is now net2deeper\(at=\.\.\.\)"):
        old = growth.net2deeper(net, after=site)
    assert _same_weights(new, old) and str(new.graph) == str(old.graph)
    recipe = surgery.recipe_of(old)
    assert recipe is not None and recipe.transforms[-1].args["at"] == site  # recorded under the new name
    with pytest.raises(GrowthError, match="got both at= and its former name after="):
        growth.net2deeper(net, at=site, after=site)
    with pytest.raises(GrowthError, match="net2deeper needs at="):
        growth.net2deeper(net)


def test_a_recipe_saved_with_after_still_loads(tmp_path: Path) -> None:
    net = _vgg()
    deeper = growth.net2deeper(net, growth.sites(net, "net2deeper", kind="conv")[0]).eval()
    surgery.save(deeper, tmp_path / "deeper")
    recipe_file = tmp_path / "deeper" / "recipe.json"
    text = recipe_file.read_text()
    assert text.count('"at":') == 1
    recipe_file.write_text(text.replace('"at":', '"after":'))  # as written before the rename
    with pytest.warns(FutureWarning, match="is now net2deeper"):
        loaded = surgery.load(tmp_path / "deeper").eval()
    x = torch.randn(2, 3, 32, 32)
    assert _same_weights(loaded, deeper) and torch.equal(loaded(x), deeper(x))


def test_growth_mutate_takes_at_for_net2deeper_and_after_with_a_warning(cli, tmp_path: Path) -> None:
    base = tmp_path / "base"
    surgery.save(_vgg(), base)
    site = growth.sites(surgery.load(base), "net2deeper", kind="conv")[0]
    common = ["mutate", base, "--op", "net2deeper", "--input", "2,3,32,32"]
    r = cli("growth", *common, "--at", site, "--out", tmp_path / "new")
    assert r.code == 0, r
    r = cli("growth", *common, "--after", site, "--out", tmp_path / "old")
    assert r.code == 0 and "warning: growth mutate --after is now --at; the old name will be removed" in r.err, r
    assert _same_weights(surgery.load(tmp_path / "new"), surgery.load(tmp_path / "old"))
    r = cli("growth", *common, "--at", site, "--after", site)
    assert r.code == 2 and "got both --at and its former name --after; give --at only" in r.err, r
