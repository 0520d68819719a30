"""How the ranks of a ``torchrun`` run share a training step: PyTorch's engines, or one flat all-reduce.

Every rank trains on its slice of each global batch and takes the same optimiser step. ``--parallel``
(:attr:`xross.run.base_config.RunConfig.parallel`) says how the gradients get there:

``ddp`` (the default)
    :class:`torch.nn.parallel.DistributedDataParallel`. A loss is back-propagated into the parameters it
    trains (a student's own under the ``alternate`` schedule, every trained one under ``joint``), and on
    its way passes through the forward of a DDP wrapper over exactly those of them its graph reaches, so
    DDP's hooks all-reduce their gradients in buckets while that backward pass still runs. The forward
    stays the cohort's own: a prefix tree of pieces shared by many paths, which no single wrapped module
    computes. One wrapper per set of trained parameters is how DDP expresses the alternate schedule's
    restricted backward passes, one per student.
``fsdp``
    FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) on every piece, adapter and exit head, on one mesh
    of every rank: parameters, gradients and optimiser state are sharded, each unit is gathered for its
    forward and backward and its gradients reduce-scattered after. FSDP2 reduces what a backward pass
    reached, so under ``alternate`` each student's pass reaches every parameter on its paths and the
    gradients of those it does not train are then put back as they were: the alternate schedule's update
    exactly, at the cost of one reduce-scatter of those parameters per student. Checkpoints are gathered
    on rank 0 (full state dicts through :mod:`torch.distributed.checkpoint.state_dict`): the same file as
    a one-process run's, which resumes on any number of ranks and which every ``xross`` command reads. A
    cohort too large for one host's memory would need sharded ``torch.distributed.checkpoint`` files instead.
``manual``
    the hand-written reduction: after the backward passes, one flat all-reduce of every gradient
    (:func:`xross.run.distributed.average_gradients`); no bucketing, no overlap. The baseline that
    ``bench/xross_cost.py`` measures the engines against.

In one process every engine is the plain step (:class:`Engine`), and its checkpoints are alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from xross.errors import XrossError
from xross.run.distributed import DistInfo, average_gradients

PARALLEL_ENGINES = ("ddp", "fsdp", "manual")


class Engine:
    """One process, or ``manual``: each backward pass as asked, the gradients averaged by hand before the step."""

    name = "manual"
    lockstep = False  # every rank must run every forward (FSDP gathers a unit's weights in its forward)

    def __init__(self, info: DistInfo):
        self.info = info
        self.root: nn.Module | None = None

    def shard(self, root: nn.Module, units: Iterable[nn.Module]) -> None:
        """Called with what a run trains (``root``) and its units, before the optimiser is built."""
        self.root = root

    def backward(self, loss: torch.Tensor, params: Sequence[nn.Parameter], retain_graph: bool = False) -> None:
        """Accumulate the gradient of ``loss`` into ``params`` (and into no other parameter)."""
        loss.backward(inputs=list(params), retain_graph=retain_graph)

    def reduce(self, params: Sequence[nn.Parameter]) -> None:
        """Before the optimiser step: what is left to make the gradients every rank's mean."""
        average_gradients(params, self.info)

    def reset(self) -> None:
        """The parameters changed (a growth): forget what was built over the old ones."""

    def describe(self) -> str:
        """One line for the start of a distributed run."""
        return f"parallel: manual (one flat all-reduce of the gradients) over {self.info.world_size} ranks"

    def model_state(self, module: nn.Module) -> dict[str, Any]:
        return module.state_dict()

    def load_model_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        module.load_state_dict(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.root is not None and any(isinstance(k, str) for k in state.get("state", {})):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            # an fsdp run's checkpoint (parameters named, not numbered) resumed on one process
            set_optimizer_state_dict(self.root, optimizer, state, options=StateDictOptions(full_state_dict=True))
            return
        optimizer.load_state_dict(state)


class DDP(Engine):
    """``ddp``: each loss through a :class:`torch.nn.parallel.DistributedDataParallel` over what it trains."""

    name = "ddp"

    def __init__(self, info: DistInfo):
        super().__init__(info)
        self.wrappers: dict[tuple[int, ...], nn.Module] = {}

    def backward(self, loss: torch.Tensor, params: Sequence[nn.Parameter], retain_graph: bool = False) -> None:
        reached = leaves_reached(loss)
        group = [p for p in params if id(p) in reached]
        if not group:
            return
        key = tuple(id(p) for p in group)  # a wrapper holds its parameters, so their ids stay theirs
        if key not in self.wrappers:
            self.wrappers[key] = self._wrap(group)
        self.wrappers[key](loss).backward(inputs=group, retain_graph=retain_graph)

    def _wrap(self, params: list[nn.Parameter]) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device = self.info.device
        options: dict[str, Any] = {"device_ids": [device] if device.type == "cuda" else None}
        if "init_sync" in inspect.signature(DistributedDataParallel).parameters:  # torch >= 2.4
            options["init_sync"] = False  # every rank built the same weights from the same seed
        return DistributedDataParallel(Trained(params), **options)  # no buffers: nothing to broadcast

    def reduce(self, params: Sequence[nn.Parameter]) -> None:
        pass  # DDP's hooks reduced every gradient during its backward pass

    def reset(self) -> None:
        self.wrappers.clear()

    def describe(self) -> str:
        return f"parallel: ddp (DistributedDataParallel, a wrapper per trained set) over {self.info.world_size} ranks"


class FSDP(Engine):
    """``fsdp``: FSDP2 ``fully_shard`` on every unit; full state dicts gathered on rank 0 for checkpoints."""

    name = "fsdp"
    lockstep = True

    def __init__(self, info: DistInfo):
        super().__init__(info)
        self.sharded: list[nn.Parameter] = []
        self.units = 0

    def shard(self, root: nn.Module, units: Iterable[nn.Module]) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # before torch 2.6 FSDP2 was not public
            raise XrossError(f"--parallel fsdp needs torch >= 2.6 (FSDP2), not {torch.__version__}") from None
        super().shard(root, units)
        mesh = init_device_mesh(self.info.device.type, (self.info.world_size,))
        for unit in units:
            if any(True for _ in unit.parameters()):  # a unit without parameters has nothing to shard
                fully_shard(unit, mesh=mesh)
                self.units += 1
        self.sharded = list(root.parameters())

    def describe(self) -> str:
        return f"parallel: fsdp ({self.units} units fully_shard-ed) over {self.info.world_size} ranks"

    def backward(self, loss: torch.Tensor, params: Sequence[nn.Parameter], retain_graph: bool = False) -> None:
        mine = {id(p) for p in params}
        kept = {p: None if p.grad is None else p.grad.clone() for p in self.sharded if id(p) not in mine}
        loss.backward(retain_graph=retain_graph)
        for p, grad in kept.items():  # what this loss does not train keeps the gradient it had
            p.grad = grad

    def reduce(self, params: Sequence[nn.Parameter]) -> None:
        pass  # reduce-scattered by FSDP2 after each unit's backward

    def model_state(self, module: nn.Module) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        module.load_state_dict(sharded_like(module.state_dict(), state))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        assert self.root is not None, "shard() comes before the optimiser"
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.root, optimizer, options=options)  # type: ignore[return-value]

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.root is not None, "shard() comes before the optimiser"
        set_optimizer_state_dict(self.root, optimizer, state, options=StateDictOptions(full_state_dict=True))


class Trained(nn.Module):
    """What a DDP wrapper wraps: the parameters one loss trains (the cohort's own), and a forward that passes
    the loss through, so that DDP prepares its hooks for that loss's backward pass."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def leaves_reached(loss: torch.Tensor) -> set[int]:
    """The ids of the leaf tensors (parameters) whose gradient a backward pass from ``loss`` accumulates."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def sharded_like(current: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """``full`` (whole tensors, as in a checkpoint) with each entry that is a DTensor in ``current`` cut into this
    rank's shard of it, as it is sharded there (every rank holds the whole tensor: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    shard_options = inspect.signature(distribute_tensor).parameters
    out = dict(full)
    for key, now in current.items():
        if isinstance(now, DTensor) and key in full:
            whole = full[key].to(device=now.device, dtype=now.dtype)
            local = {"src_data_rank": None} if "src_data_rank" in shard_options else {}  # torch >= 2.7: no scatter
            out[key] = distribute_tensor(whole, now.device_mesh, now.placements, **local)
    return out


def refuse_engine(config: Any, allowed: Sequence[str], distributed: bool) -> None:
    """One line if ``config.parallel`` cannot run here: not one of the method's ``allowed`` engines, fsdp with
    a growth, or a non-default engine outside torchrun (``distributed``: under torchrun, or resuming a run)."""
    name, why = config.parallel, None
    if name not in allowed:
        why = f"this method's step runs on {' or '.join(allowed)}"
    elif name == "fsdp" and config.grow:
        why = "a growth rebuilds the nets, which would then have to be sharded again; use --parallel ddp"
    elif name != "ddp" and not distributed:
        why = "it applies under torchrun (WORLD_SIZE > 1); launch with torchrun or drop --parallel"
    if why:
        raise XrossError(f"--parallel {name}: {why}")


def make_engine(name: str, info: DistInfo) -> Engine:
    """The engine ``name`` (one of :data:`PARALLEL_ENGINES`) for this run; the plain step in one process."""
    if not info.enabled:
        return Engine(info)
    return {"ddp": DDP, "fsdp": FSDP, "manual": Engine}[name](info)
