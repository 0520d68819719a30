"""Growth policies: ``all``, ``stages`` and ``random:N`` expanded into the steps (op, site, arguments) they mean.

A schedule says *what* to grow in a word; :func:`expand` turns the word into explicit,
replayable :class:`~growth.MutationRecord` steps on the model as it is then:

- ``all``: every site the op lists (net2wider: every coupled width group, in one step);
- ``stages``: one net2deeper after each stage (each spatial resolution): a zero-branch copy of the
  stage's last residual block, or where no block of the stage has a copy that keeps the function
  (a ResNet stage of one downsampling block) a new zero-branch residual block (``kind="residual"``);
  in a net without residual blocks an identity conv after the stage's last site (never right after
  a pooling);
- ``random:N``: N random feasible steps of the op (``any``: of every op), seeded, as :func:`growth.mutate`;
- site names (``layer2.0.conv1+layer3.0.conv1``): those sites.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from growth.block import RESIDUAL_SUMS
from growth.errors import GrowthError
from growth.graphedit import Workbench
from growth.mutation import MutationRecord, mutate
from growth.registry import OPS, SITE_LIST, get_op, sites
from surgery.core.registry import Registry
from surgery.graph.ops import is_call

Policy = Callable[..., list[MutationRecord]]
POLICIES: Registry[Policy] = Registry("growth policy", error=GrowthError)


def _site_filter(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """The op arguments its site finder takes (net2wider's amount, net2deeper's kind, ...)."""
    finder = inspect.signature(OPS[op].find_sites).parameters
    return {k: v for k, v in args.items() if k in finder}


@POLICIES.register("all")
def _all(model: nn.Module, op: str, args: dict[str, Any], seed: int, example_input: Any) -> list[MutationRecord]:
    found = sites(model, op, example_input, **_site_filter(op, args))
    if not found:
        raise GrowthError(f"{op} applies nowhere in {type(model).__name__} with {args or 'its defaults'}")
    if op == "net2wider":  # one step widens every group once
        return [MutationRecord(op=op, site=SITE_LIST.join(found), args=args)]
    return [MutationRecord(op=op, site=s, args={**getattr(s, "args", {}), **args}) for s in found]


@POLICIES.register("stages")
def _stages(model: nn.Module, op: str, args: dict[str, Any], seed: int, example_input: Any) -> list[MutationRecord]:
    if op != "net2deeper":
        raise GrowthError(f"the stages policy grows deeper: give net2deeper, not {op}")
    work = Workbench(model, example_input, read_only=True)
    blocks = sites(model, op, example_input, kind="block")
    kind = args.get("kind", "residual" if blocks else "conv")
    last_site: dict[tuple[int, ...], str] = {}  # per resolution, in graph order: the last site wins
    for site in sites(model, op, example_input, kind=kind):
        if not _is_pool(work, site):  # a layer after the pooling that ends a stage is not inside any stage
            last_site[_resolution(work, site)] = site
    if not last_site and not blocks:
        raise GrowthError(f"the stages policy finds no residual block and no {kind} site in {type(model).__name__}")
    last_block: dict[tuple[int, ...], str] = {}
    for block in blocks:
        calls = work.index.module_calls[block][0]
        last_block[_resolution(work, work.site_name(work.index.nodes[max(calls)]))] = block
    stages = dict.fromkeys([*last_site, *last_block])
    if blocks:  # a stage is a resolution with residual sums: not the stem before the first block
        stages = dict.fromkeys(s for s in stages if s in _summed_resolutions(work))
    steps = []
    for size in stages:  # a copy of the stage's last block, else a new one
        if size in last_block:
            steps.append(MutationRecord(op=op, site=last_block[size], args={**args, "kind": "block"}))
        else:
            steps.append(MutationRecord(op=op, site=last_site[size], args={**args, "kind": kind}))
    return steps


def _summed_resolutions(work: Workbench) -> set[tuple[int, ...]]:
    """The spatial sizes of the 4-D values made by a residual sum."""
    found = set()
    for node in work.gm.graph.nodes:
        shape = work.shape(node) if is_call(node, RESIDUAL_SUMS) else None
        if shape is not None and len(shape) == 4:
            found.add(tuple(shape[2:]))
    return found


def _resolution(work: Workbench, site: str) -> tuple[int, ...]:
    shape = work.shape(work.node(site))
    return tuple(shape[2:]) if shape is not None else ()


POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _is_pool(work: Workbench, site: str) -> bool:
    node = work.node(site)
    if node.op == "call_module":
        return isinstance(work.gm.get_submodule(str(node.target)), POOLS)
    return "pool" in getattr(node.target, "__name__", str(node.target))


@POLICIES.register("random")
def _random(
    model: nn.Module, op: str, args: dict[str, Any], seed: int, example_input: Any, count: int = 1
) -> list[MutationRecord]:
    if args:
        raise GrowthError(f"random growth draws its own arguments; drop {', '.join(args)}")
    ops = None if op == "any" else [get_op(op).name]
    _, records = mutate(model, steps=count, seed=seed, ops=ops, example_input=example_input)
    return [MutationRecord(op=r.op, site=r.site, args=r.args) for r in records]


def expand(
    model: nn.Module, op: str, where: str, *, seed: int = 0, example_input: Any = None, **args: Any
) -> list[MutationRecord]:
    """The steps ``op`` at ``where`` (a policy, ``random:N``, or site names joined by ``+``) means on ``model``.

    ``args`` are the op's own arguments (``factor=2``); ``seed`` drives ``random:N`` and is the op's own
    ``seed`` unless ``args`` give one, so that the steps replay exactly.
    A policy or site that does not apply is a one-line :class:`~growth.errors.GrowthError`.

    >>> import torchvision, growth
    >>> net = torchvision.models.resnet18()
    >>> [(r.site, r.args) for r in growth.expand(net, "net2deeper", "stages")]  # doctest: +NORMALIZE_WHITESPACE
    [('layer1.1', {'kind': 'block'}), ('layer2.1', {'kind': 'block'}), ('layer3.1', {'kind': 'block'}),
     ('layer4.1', {'kind': 'block'})]
    >>> [r.args for r in growth.expand(net, "net2wider", "all", factor=2)]
    [{'factor': 2, 'seed': 0}]
    """
    name, _, count = where.partition(":")
    if name == "random":
        if not count.isdigit() or int(count) < 1:
            raise GrowthError(f"random growth needs a count of steps: random:N with N >= 1, not '{where}'")
        return _random(model, op, args, seed, example_input, count=int(count))
    if op == "any":
        raise GrowthError("'any' op goes with random:N only; name an op for other sites")
    if "seed" not in args and "seed" in inspect.signature(get_op(op).fn).parameters:
        args = {**args, "seed": seed}  # the steps replay exactly: every draw of the op is seeded
    if name in POLICIES and not count:
        return POLICIES.get(name)(model, op, args, seed, example_input)
    listed = where.split(SITE_LIST)
    if op == "net2wider" or len(listed) == 1:
        return [MutationRecord(op=op, site=where, args=args)]
    return [MutationRecord(op=op, site=s, args=args) for s in listed]
