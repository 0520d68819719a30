"""Growth during training, as every run engine does it: the schedule tried out at set-up, each growth before
its step (the optimiser rebuilt and its state carried), the teachers of ``--grow-kd``, the replay of a
checkpoint's growths, and the training FLOPs a step costs.

:class:`GrowthDuringTraining` is a base of :class:`xross.run.engine.RunEngine`; an engine that can grow
fills in the hooks below (``growable``, ``growth_state``, ``grow_net``, ``growth_probe``,
``forward_flops``), as :class:`xross.methods.trainer.Trainer` and :class:`xross.methods.distiller.Distiller` do.
The schedule's syntax and the log's records are :mod:`xross.run.growing`; the optimiser state's carry,
:mod:`xross.run.carry`.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import growth
from growth.provenance import Origin
from surgery.core.errors import UserError
from surgery.core.util import first_line
from xross.data import derive_seed
from xross.errors import XrossError
from xross.run import carry
from xross.run.config import RunConfig
from xross.run.distributed import DistInfo, globalise_batchnorm, same_on_every_rank
from xross.run.growing import GrowthEntry, GrowthItem, parse_item, write_log
from xross.run.optim import ParamGroup, make_optimizer
from xross.run.parallel import Engine


@dataclasses.dataclass(frozen=True)
class HowToGrow:
    """How a growth during training is done (a replay rebuilds only the structure): ``carry`` the optimiser
    state (find each parameter's origin), ``init`` the new units (``copy`` or ``random``, seeded by ``seed``)."""

    carry: bool
    init: str
    seed: int


@dataclasses.dataclass(frozen=True)
class PlannedGrowth:
    """A growth of the schedule as the run will do it: before global step ``step``, per net the explicit steps."""

    step: int
    item: GrowthItem
    nets: dict[int, list[growth.MutationRecord]]


class GrowthDuringTraining:
    """The growth half of a run engine (see the module doc); the engine provides what is declared here."""

    config: RunConfig
    dist: DistInfo
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    progress: bool
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    parallel: Engine
    total_steps: int
    train_loader: Any
    position: Any

    def param_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compile(self) -> None:
        """``torch.compile`` the trained modules (CUDA only)."""

    # --- hooks ----------------------------------------------------------------------------------

    def growable(self) -> list[nn.Module]:
        """The whole networks a growth schedule grows, by index (``net=I``); none: the run cannot grow."""
        return []

    def growth_state(self) -> dict[str, Any]:
        """The attributes a growth changes: the schedule is tried out at set-up on a copy of them."""
        return {}

    def grow_net(
        self, net: int, steps: list[growth.MutationRecord], example: torch.Tensor | None, how: HowToGrow | None
    ) -> dict[torch.nn.Parameter, Origin]:
        """Grow net ``net`` by ``steps`` in place, and return where each new parameter came from (with
        ``how.carry``). ``how``: a growth during training (``example``: images of its batch); None: a replay
        of the structure alone."""
        raise NotImplementedError

    def growth_probe(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits of everything trained on ``images`` (eval mode, no gradient), by name; ``net{i}``: net i's."""
        raise NotImplementedError

    def forward_flops(self) -> tuple[int, int]:
        """Forward FLOPs per image of what trains, and of what only runs forward (teachers)."""
        return 0, 0

    # --- the growths -----------------------------------------------------------------------------

    def _start_growth(self) -> None:
        """The growth state of a run that has not grown yet, and its schedule tried out (at set-up)."""
        self.growth_log: list[GrowthEntry] = []
        self.growth_teachers: dict[int, nn.Module] = {}  # --grow-kd: the nets as they were before the last growth
        self.growth_kd_until = -1  # ... distilled from until this global step
        self._before_growth: dict[int, nn.Module] = {}
        self.growth_plan = self._plan_growth() if self.config.grow else []
        self._growth_row: dict[str, float] = {}
        self.flop_counts = self._count_flops()

    def _grow_if_due(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Every growth the schedule places before the next step, on its batch."""
        while len(self.growth_log) < len(self.growth_plan):
            planned = self.growth_plan[len(self.growth_log)]
            if planned.step != self.position.global_step:
                return
            self._grow(planned, images, labels)

    def _growth_checkpoint(self) -> dict[str, Any]:
        """What a checkpoint holds of the growths: the log, and with ``grow_kd`` in an open window its teachers."""
        state: dict[str, Any] = {"growth": [entry.model_dump() for entry in self.growth_log]}
        if self.position.global_step < self.growth_kd_until:
            nets = {i: m.state_dict() for i, m in self.growth_teachers.items()}
            state["growth_teachers"] = {"until": self.growth_kd_until, "nets": nets}
        return state

    def _plan_growth(self) -> list[PlannedGrowth]:
        """Expand the schedule into explicit steps by trying every growth, in order, on the nets as they will
        be then (and restoring them): a growth that cannot apply is one line now, before training starts."""
        cfg, items = self.config, [parse_item(text) for text in self.config.grow]
        steps_per_epoch = len(self.train_loader)
        timed = sorted(((item.step_of(self.total_steps, steps_per_epoch), n, item) for n, item in enumerate(items)))
        saved = self.growth_state()
        for name, value in copy.deepcopy(saved).items():  # one copy: what is shared stays shared
            setattr(self, name, value)
        plan = []
        try:
            for step, n, item in timed:
                if not 0 < step < self.total_steps:
                    raise XrossError(
                        f"grow '{item.text}' falls at step {step}, outside the run's {self.total_steps} steps; "
                        "grow at a fraction in (0, 1) or an epoch/step inside the run"
                    )
                nets = self.growable()
                if item.net is not None and item.net >= len(nets):
                    raise XrossError(f"grow '{item.text}': net={item.net}, but the run trains {len(nets)} net(s)")
                chosen = [item.net] if item.net is not None else list(range(len(nets)))
                per_net = {}
                for i in chosen:
                    try:
                        steps = growth.expand(
                            self.growable()[i], item.op, item.sites, seed=derive_seed("grow", cfg.seed, n, i),
                            example_input=self._growth_example(), **item.args,
                        )  # fmt: skip
                        self.grow_net(i, steps, None, None)
                    except UserError as e:  # the op's GrowthError, a cut's SurgeryError, an adapter's XrossError
                        raise XrossError(f"grow '{item.text}' (net {i}): {first_line(e)}") from None
                    per_net[i] = steps
                plan.append(PlannedGrowth(step, item, per_net))
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
        return plan

    def _check_growth_plan(self, checkpoint: Path) -> None:
        """A resumed run's schedule must agree with the growths its checkpoint made, and not have moved one it
        has not made yet to a step already passed (raising ``epochs`` moves the fractions of the run)."""
        done, plan = self.growth_log, self.growth_plan
        if len(done) > len(plan) or any(e.item != p.item.text for e, p in zip(done, plan)):
            raise XrossError(
                f"checkpoint {checkpoint} grew by {[e.item for e in done]}, which this run's --grow schedule "
                f"{[p.item.text for p in plan]} does not begin with; resume with the run's own schedule"
            )
        if len(done) < len(plan) and plan[len(done)].step < self.position.global_step:
            nxt = plan[len(done)]
            raise XrossError(
                f"grow '{nxt.item.text}' now falls at step {nxt.step}, before the checkpoint's step "
                f"{self.position.global_step} (the run is longer now, and fractions of it moved); resume without "
                "raising --epochs, or give the growths as epoch=E / step=S"
            )

    def batchnorm_transform(self) -> Callable[[nn.Module], nn.Module] | None:
        """What makes the BatchNorms a growth adds global, as the build made the others (data-parallel runs
        with ``sync_bn``); None otherwise."""
        if not (self.dist.enabled and self.config.sync_bn):
            return None
        return lambda net: globalise_batchnorm(net, self.device)

    def _growth_example(self) -> torch.Tensor:
        size = self.config.image_size or 32
        return torch.zeros(2, 3, size, size, dtype=self.dtype, device=self.device)

    def _grow(self, planned: PlannedGrowth, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One growth of the schedule, before the step on this batch: grow, rebuild the optimiser, measure."""
        cfg = self.config
        x = self.prepare_images(images.to(self.device))
        y = labels.to(self.device)
        before = self.growth_probe(x)
        params_before, flops_before = sum(p.numel() for p in self.params), sum(self.flop_counts)
        self._keep_growth_teachers(planned)
        origins: dict[nn.Parameter, Origin] = {}
        example = same_on_every_rank(x, self.dist)  # every rank grows the same weights
        for net, steps in planned.nets.items():
            how = HowToGrow(
                carry=cfg.grow_optimizer == "carry",
                init=cfg.grow_init,
                seed=derive_seed("grow-init", cfg.seed, len(self.growth_log), net),
            )
            origins.update(self.grow_net(net, steps, example, how))
        self._rebuild_optimizer(origins, cfg.grow_optimizer)
        after = self.growth_probe(x)
        self.flop_counts = self._count_flops()
        scale = max(float(v.abs().max()) for v in before.values())
        change = max(float((after[k] - before[k]).abs().max()) for k in before)
        entry = GrowthEntry(
            item=planned.item.text,
            global_step=self.position.global_step,
            nets={
                i: [r.model_dump(mode="json", include={"op", "site", "args"}) for r in s]
                for i, s in planned.nets.items()
            },
            params_before=params_before,
            params_after=sum(p.numel() for p in self.params),
            flops_before=flops_before,
            flops_after=sum(self.flop_counts),
            loss_before={int(k[3:]): _ce(v, y) for k, v in before.items() if k.startswith("net")},
            loss_after={int(k[3:]): _ce(v, y) for k, v in after.items() if k.startswith("net")},
            max_logit_change=change / scale if scale > 0 else change,
            optimizer=cfg.grow_optimizer,
            init=cfg.grow_init,
        )
        self.growth_log.append(entry)
        self._growth_row = {
            **{f"grow_loss_before{i}": v for i, v in entry.loss_before.items()},
            **{f"grow_loss_after{i}": v for i, v in entry.loss_after.items()},
            "grow_logit_change": entry.max_logit_change,
        }
        if self.dist.is_main:
            write_log(self.run_dir, self.growth_log)
            if self.progress:
                print(
                    f"grew at step {entry.global_step} ({entry.item}): {entry.params_before:,} -> "
                    f"{entry.params_after:,} parameters; loss "
                    + ", ".join(f"{entry.loss_before[i]:.4f} -> {entry.loss_after[i]:.4f}" for i in entry.loss_before)
                    + f"; max logit change {entry.max_logit_change:.1e} (relative)",
                    file=sys.stderr,
                )

    def growth_teacher(self, net: int) -> nn.Module | None:
        """With ``grow_kd``, net ``net`` as it was before its last growth while the steps distilling from it last."""
        if self.position.global_step >= self.growth_kd_until:
            return None
        return self.growth_teachers.get(net)

    def _keep_growth_teachers(self, planned: PlannedGrowth) -> None:
        """``grow_kd``: before the first growth of a step, a frozen copy of every net; the grown ones teach."""
        kd = self.config.grow_kd_terms()
        if kd is None:
            return
        until = self.position.global_step + kd[2]
        if self.growth_kd_until != until:
            self.growth_kd_until = until
            self._before_growth = {i: _frozen(net) for i, net in enumerate(self.growable())}
            self.growth_teachers = {}
        self.growth_teachers.update({i: self._before_growth[i] for i in planned.nets})

    def _replay_growth(self, entries: list[GrowthEntry], state: dict[str, Any] | None = None) -> None:
        """Rebuild the structure a checkpoint was saved with: the logged growths replayed before its weights load
        (with ``grow_kd`` in a window still open, the nets as they were before the last growth too)."""
        teachers = (state or {}).get("growth_teachers")
        last = entries[-1].global_step if entries else -1
        for entry in entries:
            if teachers and entry.global_step == last and not self.growth_teachers:
                self.growth_teachers = {int(i): _frozen(self.growable()[int(i)]) for i in teachers["nets"]}
                self.growth_kd_until = int(teachers["until"])
            for net, steps in entry.steps().items():
                self.grow_net(net, steps, None, None)
        for i, weights in (teachers or {}).get("nets", {}).items():
            self.growth_teachers[int(i)].load_state_dict(weights)
        if entries:
            self._rebuild_optimizer({}, "reset")
            self.flop_counts = self._count_flops()
        self.growth_log = list(entries)

    def _rebuild_optimizer(self, origins: dict[nn.Parameter, Origin], mode: str) -> None:
        groups = self.param_groups()
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = carry.rebuild(self.optimizer, make_optimizer(groups, self.config), origins, mode)
        self.parallel.reset()  # DDP wrappers hold the parameters as they were
        if self.config.compile and self.device.type == "cuda":
            self.compile()

    def _growth_warmup(self, global_step: int) -> float:
        """The factor of the learning rate in the ``grow_warmup`` steps after a growth (1 otherwise)."""
        warm = self.config.grow_warmup
        since = [global_step - g.step for g in self.growth_plan if 0 <= global_step - g.step < warm]
        return (min(since) + 1) / warm if since else 1.0

    @property
    def flops_per_image(self) -> int:
        """Training FLOPs per image of a step: the forward, a backward of about twice its cost, the teachers."""
        trained, fixed = self.flop_counts
        return 3 * trained + fixed

    def _count_flops(self) -> tuple[int, int]:
        """:meth:`forward_flops`, or none if torch's FLOP counter cannot run a net (it still trains)."""
        try:
            return self.forward_flops()
        except Exception as e:  # noqa: BLE001 - a net torch's FLOP counter cannot run must still train
            warnings.warn(
                f"training FLOPs are not counted for this run ({first_line(e)}); train_flops stays 0", stacklevel=2
            )
            return 0, 0


def _frozen(net: nn.Module) -> nn.Module:
    """A copy of ``net`` that only runs forward, in eval mode."""
    copied = copy.deepcopy(net).eval()
    return copied.requires_grad_(False)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double(), labels))
