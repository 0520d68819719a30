"""Every registry of the library has one shape, and the tables grow from outside the library.

* every module-level table of surgery, growth and xross is a ``surgery.core.registry.Registry``
  and refuses an unknown name in one line with its package's error class;
* a growth op registered from this module is listed by ``growth.OPS`` and ``growth.sites`` and
  replays from a saved recipe (one ``register_op`` call registers both);
* a layer type added here with ``register_rule`` and ``register_edit`` is permuted by
  ``surgery.permute_channels`` and widened by ``growth.net2wider`` through its own edit.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

import growth
import surgery
import xross
from growth.errors import GrowthError
from growth.graphedit import Workbench
from growth.registry import GrowthOp, register_op, unregister_op
from surgery.channels import register_edit, register_rule
from surgery.channels.edits import take_rows
from surgery.channels.registry import MODULE_RULES, WEIGHT_EDITS
from surgery.core.errors import SurgeryError, UserError
from surgery.core.recipe import REPLAYS, extend_recipe
from surgery.core.registry import Registry
from surgery.graph.capture import traced_copy
from xross.errors import XrossError

ERRORS: dict[str, type[UserError]] = {"surgery": SurgeryError, "growth": GrowthError, "xross": XrossError}
# the tables this library keeps (a module-level dict or list under one of these names would be a second shape)
NAMED = re.compile(r"^_?[A-Z_]*(RULES|EDITS|REPLAYS|SOURCES|LOADERS|OPS|OPTIMIZERS|SCHEDULES|METHODS|KINDS|CONFIGS)$")


def _modules() -> Iterator[Any]:
    for package in (surgery, growth, xross):
        yield package
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            yield importlib.import_module(info.name)


def _registries() -> dict[str, tuple[Registry[Any, Any], str, set[str]]]:
    """Every Registry bound at module level, by its kind (``"growth op"``), with its package and all its names."""
    found: dict[int, tuple[Registry[Any, Any], set[str]]] = {}
    for module in _modules():
        for name, value in vars(module).items():
            if isinstance(value, Registry):
                found.setdefault(id(value), (value, set()))[1].add(f"{module.__name__}.{name}")
    layer = list(ERRORS).index  # a registry belongs to the lowest package that names it (where it is defined)
    table = {
        registry.kind: (registry, min((a.split(".")[0] for a in aliases), key=layer), aliases)
        for registry, aliases in found.values()
    }
    assert len(table) == len(found), "two registries share a kind; their messages would not tell them apart"
    return table


def test_every_table_is_a_registry() -> None:
    tables = [
        (f"{m.__name__}.{name}", value)
        for m in _modules()
        for name, value in vars(m).items()
        if NAMED.match(name) and not isinstance(value, (str, tuple, frozenset))
    ]
    assert tables, "no tables found"
    assert [where for where, value in tables if not isinstance(value, Registry)] == []
    names = {alias for _, _, aliases in _registries().values() for alias in aliases}
    for expected in (
        "surgery.core.recipe.REPLAYS",
        "surgery.graph.ops.OPS",
        "surgery.channels.registry.MODULE_RULES",
        "surgery.channels.registry.FUNCTION_RULES",
        "surgery.channels.registry.METHOD_RULES",
        "surgery.channels.registry.LITERAL_EDITS",
        "surgery.channels.registry.HEAD_EDITS",
        "surgery.channels.registry.WEIGHT_EDITS",
        "surgery.models.ecosystems.SOURCES",
        "surgery.files.refs.RUN_LOADERS",
        "growth.registry.OPS",
        "xross.run.optim.OPTIMIZERS",
        "xross.run.optim.SCHEDULES",
    ):
        assert expected in names, expected


@pytest.mark.parametrize("kind", sorted(_registries()))
def test_an_unknown_name_is_one_line_naming_the_closest(kind: str) -> None:
    registry, package, where = _registries()[kind]
    with pytest.raises(UserError) as caught:
        registry.get("no-such-entry")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"unknown {registry.kind} 'no-such-entry'")
    assert isinstance(caught.value, ERRORS[package]), (where, type(caught.value).__name__)
    if len(registry):
        first = registry.names()[0]
        assert f"choose one of {first}" in message


def test_growth_errors_are_growth_errors() -> None:
    with pytest.raises(GrowthError, match=r"^unknown growth op 'net2wide' \(closest: net2wider"):
        growth.OPS.get("net2wide")
    with pytest.raises(XrossError, match=r"^unknown lr schedule 'cosin' \(closest: cosine"):
        xross.run.optim.SCHEDULES.get("cosin")


# ----------------------------------------------------------------------------- a growth op from outside


def identity_at(model: nn.Module, at: str, *, example_input: Any = None, check: bool = False) -> fx.GraphModule:
    """The toy op: the ReLU at ``at`` becomes an ``nn.Identity`` (a structural change a recipe must replay)."""
    result = traced_copy(model, example_input)
    if not isinstance(result.get_submodule(at), nn.ReLU):
        raise GrowthError(f"identity_at needs a ReLU at '{at}'")
    owner, _, name = at.rpartition(".")
    setattr(result.get_submodule(owner), name, nn.Identity())
    extend_recipe(result, model, "identity_at", at=at)
    return result


def _relu_sites(work: Workbench) -> list[str]:
    return [name for name, m in work.gm.named_modules() if isinstance(m, nn.ReLU)]


@pytest.fixture
def toy_op() -> Iterator[GrowthOp]:
    op = register_op(GrowthOp("identity_at", identity_at, ("at",), _relu_sites, lambda rng, work: None, 0.0))
    yield op
    if "identity_at" in growth.OPS:
        unregister_op("identity_at")


def _vgg() -> nn.Module:
    return surgery.build_model("growth.models:small_vgg", widths=[4, 8], num_classes=3, image_size=16).eval()


def test_a_growth_op_registered_here_is_listed_and_replays(toy_op: GrowthOp, tmp_path: Path) -> None:
    net = _vgg()
    assert "identity_at" in growth.OPS and "identity_at" in REPLAYS
    assert growth.sites(net, "identity_at") == ["features.0.block.relu", "features.1.block.relu"]
    grown = growth.OPS["identity_at"].apply(net, "features.1.block.relu", {})
    assert isinstance(grown.features[1].block.relu, nn.Identity)
    loaded = surgery.load(surgery.save(grown, tmp_path / "grown")).eval()
    assert isinstance(loaded.features[1].block.relu, nn.Identity)
    assert isinstance(loaded.features[0].block.relu, nn.ReLU)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), grown.eval()(x))
    unregister_op("identity_at")
    assert "identity_at" not in growth.OPS and "identity_at" not in REPLAYS
    with pytest.raises(SurgeryError, match=r"recipe transform 0 \('identity_at'\) is unknown here"):
        surgery.load(tmp_path / "grown")


def test_an_op_name_is_registered_once(toy_op: GrowthOp) -> None:
    with pytest.raises(GrowthError, match="growth op 'identity_at' is registered already"):
        register_op(GrowthOp("identity_at", identity_at, ("at",), _relu_sites, lambda rng, work: None, 0.0))


# ----------------------------------------------------------------------------- a layer type from outside


class ChannelScale(nn.Module):
    """A per-channel scale fx cannot trace into (its check branches on a shape), so it stays one call."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.scale.numel():
            raise ValueError("wrong channel count")
        return x * self.scale.view(1, -1, 1, 1)


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = ChannelScale(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.scale(self.conv(x))))


def _scale_rule(walk: Any, node: fx.Node, layer: ChannelScale) -> Any:
    """Its scale follows the channels of its input, which it passes on."""
    from surgery.channels.groups import Endpoint

    layout = walk.layout(node.args[0])
    if layout is not None:
        walk.add(layout, "followers", Endpoint(node.name, str(node.target), "ChannelScale", node.name))
    return layout


def _scale_through(layer: ChannelScale, m: Any, endpoint: Any) -> None:
    take_rows(layer, m, ("scale",))


@pytest.fixture
def toy_layer() -> Iterator[None]:
    register_rule(ChannelScale)(_scale_rule)
    register_edit(ChannelScale, through=_scale_through)
    yield
    MODULE_RULES.unregister(ChannelScale)
    WEIGHT_EDITS.unregister(ChannelScale)


X8 = torch.randn(2, 3, 8, 8)


def test_without_its_rule_a_new_layer_blocks_the_channels() -> None:
    with pytest.raises(SurgeryError, match="cannot be permuted"):
        surgery.permute_channels(ScaledNet().eval(), "conv", [5, 4, 3, 2, 1, 0], example_input=X8)


def test_a_layer_type_registered_here_is_permuted_and_widened(toy_layer: None) -> None:
    net = ScaledNet().eval()
    perm = [2, 0, 5, 1, 4, 3]
    moved = surgery.permute_channels(net, "conv", perm, example_input=X8).eval()
    assert torch.equal(moved.scale.scale.detach(), net.scale.scale.detach()[perm])
    assert torch.equal(moved.conv.weight, net.conv.weight[perm])
    torch.testing.assert_close(moved(X8), net(X8), rtol=0, atol=1e-6)

    wide = growth.net2wider(net, "conv", new_width=9, seed=0, example_input=X8).eval()
    assert wide.scale.scale.shape == (9,) and wide.head.in_channels == 9
    index = [int((net.conv.weight == w).all(dim=(1, 2, 3)).nonzero()) for w in wide.conv.weight]
    assert torch.equal(wide.scale.scale.detach(), net.scale.scale.detach()[index])
    torch.testing.assert_close(wide(X8), net(X8), rtol=0, atol=1e-5)
