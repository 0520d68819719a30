"""The growth ops by name: where each applies, how random growth draws it, how to run it from a record.

Every op module registers a :class:`GrowthOp` with one call to :func:`register_op`,
which also registers the op's recipe replay (so a saved grown model rebuilds);
:func:`sites` and random growth (:mod:`growth.mutation`) only go through this table.

>>> import torchvision, growth
>>> growth.sites(torchvision.models.resnet18(), "net2wider")[:3]
['conv1', 'layer1.0.conv1', 'layer1.0.conv2']
>>> sorted(growth.OPS)
['add_skip', 'net2branch', 'net2deeper', 'net2wider', 'widen_kernel']
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from growth.errors import GrowthError
from growth.graphedit import Workbench, replay_of
from surgery.core.recipe import REPLAYS, register_replay
from surgery.core.registry import Registry

SiteFinder = Callable[..., Sequence[str]]
Proposal = tuple[str, dict[str, Any]]
Proposer = Callable[[random.Random, Workbench], "Proposal | None"]


@dataclass(frozen=True)
class GrowthOp:
    """One op: the function, the parameters a site fills, its site finder and random proposer.

    ``find_sites(work, **args)`` lists the sites where the op applies with ``args``;
    ``propose(rng, work)`` draws a feasible ``(site, args)`` or None; ``probability`` is
    its default weight in random growth.

    >>> import growth
    >>> op = growth.OPS["add_skip"]
    >>> op.site_params, op.site_args("layer1->layer2")
    (('src', 'dst'), {'src': 'layer1', 'dst': 'layer2'})
    """

    name: str
    fn: Callable[..., fx.GraphModule]
    site_params: tuple[str, ...]
    find_sites: SiteFinder
    propose: Proposer
    probability: float

    def site_args(self, site: str) -> dict[str, str | list[str]]:
        """``{"at": site}``, ``{"at": [a, b]}`` for several sites ``"a+b"`` (net2wider widens each group once),
        or ``{"src": a, "dst": b}`` for a two-name site ``"a->b"``."""
        if len(self.site_params) == 1 and SITE_LIST in site:
            return {self.site_params[0]: site.split(SITE_LIST)}  # type: ignore[dict-item]
        parts = site.split(SITE_JOIN) if len(self.site_params) > 1 else [site]
        if len(parts) != len(self.site_params):
            raise GrowthError(f"{self.name} sites look like {SITE_JOIN.join(self.site_params)}; got '{site}'")
        return dict(zip(self.site_params, parts))

    def apply(
        self, model: nn.Module, site: str, args: dict[str, Any], example_input: Any = None, check: bool = False
    ) -> fx.GraphModule:
        return self.fn(model, **self.site_args(site), **args, example_input=example_input, check=check)


class Site(str):
    """A site name that also carries the op arguments it was found with (``site.args``), for ops with several kinds.

    It is the plain name everywhere a string is expected; ``op(model, site, **site.args)``
    does what it was listed for.

    >>> site = Site("layer1.1", kind="block")
    >>> site, site.args, site == "layer1.1"
    ('layer1.1', {'kind': 'block'}, True)
    """

    args: dict[str, Any]

    def __new__(cls, name: str, **args: Any) -> Site:
        site = super().__new__(cls, name)
        site.args = args
        return site


SITE_JOIN = "->"
SITE_LIST = "+"
MAX_GROWTH = 16  # one step makes a layer at most this many times wider (grow further in several steps)
MAX_KERNEL = 31  # the largest kernel side a step creates
OPS: Registry[GrowthOp] = Registry("growth op", error=GrowthError)


def register_op(op: GrowthOp, *, replace: bool = False) -> GrowthOp:
    """Add ``op`` to :data:`OPS` and its recipe replay (:func:`growth.graphedit.replay_of`) under the same name.

    ``replace=True`` replaces an op of that name (and its replay); :func:`unregister_op` removes both.
    """
    OPS.register(op.name, op, replace=replace)
    if replace and op.name in REPLAYS:
        REPLAYS.unregister(op.name)
    register_replay(op.name)(replay_of(op.fn))
    return op


def unregister_op(name: str) -> None:
    """Remove the op ``name`` and its recipe replay (a test's toy op, say)."""
    OPS.unregister(name)
    REPLAYS.unregister(name)


def get_op(name: str) -> GrowthOp:
    """The op registered as ``name``, or a one-line :class:`~growth.errors.GrowthError` naming the closest ops."""
    return OPS.get(name)


def sites(model: nn.Module, op: str, example_input: Any = None, **args: Any) -> list[str]:
    """Where ``op`` applies in ``model`` (with ``args``, e.g. ``kind="linear"`` for net2deeper), in graph order.

    Without ``kind``, net2deeper lists the sites of every kind (conv, linear, then residual
    blocks); each is a :class:`Site` whose ``args`` name its kind:

    >>> import torchvision, growth
    >>> found = growth.sites(torchvision.models.resnet18(), "net2deeper")
    >>> [(s, s.args) for s in found if s.args["kind"] == "block"][:2]
    [('layer1.0', {'kind': 'block'}), ('layer1.1', {'kind': 'block'})]
    """
    return list(get_op(op).find_sites(Workbench(model, example_input, read_only=True), **args))


def not_applicable(op: str, site: str, reason: str, applicable: Sequence[str]) -> GrowthError:
    """The one-line refusal: why ``op`` does not apply at ``site``, and where it does."""
    shown = ", ".join(applicable[:8]) + (f", ... ({len(applicable)} in all)" if len(applicable) > 8 else "")
    return GrowthError(f"{op} does not apply at '{site}': {reason}; applicable sites: {shown or 'none in this model'}")
