"""The training objectives: Independent, KD, DML and XML (RESEARCH.md sections 1-2).

Every mode says which paths it needs and gives, for student i, named loss terms and
their weighted total. Teacher distributions are always detached. Each is a method of the
table (:mod:`xross.run.table`), registered with the cohort trainer (:mod:`xross.methods.trainer`).

* independent: ``CE_i``
* kd:  ``alpha * CE_i + (1 - alpha) * T^2 * KL(softmax(t/T), softmax(s_i/T))``, t a fixed
  teacher (ensembles average their softmax)
* dml: ``0.5 * CE_i + 0.5 * mean_j KL(p_j, p_i)`` (``peer_target="ensemble"``: ``KL(mean_j p_j, p_i)``)
* xml: ``(CE_i + mean_j KL(p_j, p_i) + w * sum_j sum_{pi in cross(i,j)} [KL(p_j, p_pi) + CE(p_pi, y)])
  / (n_cross (K - 1))`` where cross(i, j) are the paths through parts of i and j only
  (2^P - 2 of them, so the normaliser is 2(K-1) at P = 2, as in the research); ``w`` is
  ``cross_weight`` (1 in the research).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from xross.cohort.grid import Cohort, Route
from xross.data.labels import hard_label_ce, upcast
from xross.errors import XrossError


def kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(p_t || p_s)`` averaged over the batch; the teacher side is detached."""
    t = F.log_softmax(upcast(teacher_logits.detach()) / temperature, dim=1)
    s = F.log_softmax(upcast(student_logits) / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)


@dataclasses.dataclass
class LossTerms:
    """Named loss terms of one student and their weighted total."""

    terms: dict[str, torch.Tensor]
    total: torch.Tensor


def growth_kd(
    loss: LossTerms, logits: torch.Tensor, before: torch.Tensor, temperature: float, alpha: float
) -> LossTerms:
    """``(1 - alpha) x loss + alpha x T^2 KL(before || logits)``: a net just grown distils from itself as it was
    (``--grow-kd``; the term is logged as ``grow_kd``).

    >>> import torch
    >>> x = torch.randn(4, 10)
    >>> out = growth_kd(LossTerms({}, torch.tensor(2.0)), x, x, temperature=2.0, alpha=0.25)
    >>> float(out.total), float(out.terms["grow_kd"])
    (1.5, 0.0)
    """
    term = kl(before, logits, temperature) * temperature**2
    return LossTerms({**loss.terms, "grow_kd": term}, (1 - alpha) * loss.total + alpha * term)


def _path_tag(path: Route) -> str:
    return "-".join(map(str, path))


@dataclasses.dataclass
class Mode:
    """Base: which paths a step needs and each student's loss."""

    label_smoothing: float = 0.0

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return hard_label_ce(logits, labels, self.label_smoothing)

    def paths(self, cohort: Cohort) -> list[Route]:
        return [cohort.own_path(i) for i in range(cohort.num_nets)]

    def loss(
        self,
        i: int,
        logits: dict[Route, torch.Tensor],
        labels: torch.Tensor,
        cohort: Cohort,
        teacher: torch.Tensor | None = None,
    ) -> LossTerms:
        raise NotImplementedError


@dataclasses.dataclass
class Independent(Mode):
    def loss(self, i, logits, labels, cohort, teacher=None) -> LossTerms:
        ce = self.ce(logits[cohort.own_path(i)], labels)
        return LossTerms({"ce": ce}, ce)


@dataclasses.dataclass
class KD(Mode):
    temperature: float = 4.0
    alpha: float = 0.5

    def loss(self, i, logits, labels, cohort, teacher=None) -> LossTerms:
        if teacher is None:
            raise XrossError("mode kd needs a teacher (--teacher DIR or name)")
        own = logits[cohort.own_path(i)]
        ce = self.ce(own, labels)
        soft = kl(teacher, own, self.temperature) * self.temperature**2
        return LossTerms({"ce": ce, "kd": soft}, self.alpha * ce + (1 - self.alpha) * soft)


def peer_kl(i: int, logits: dict[Route, torch.Tensor], cohort: Cohort, target: str = "mean") -> torch.Tensor:
    """Student i's mutual term: the mean of its KL to each peer (``target="mean"``, DML), or its KL to the
    peers' ensemble, the mean of their softmax (``"ensemble"``, DML_e; lower entropy). The same for K = 2."""
    own = logits[cohort.own_path(i)]
    peers = [logits[cohort.own_path(j)] for j in range(cohort.num_nets) if j != i]
    if target == "ensemble":
        probs = torch.stack([upcast(p.detach()).softmax(1) for p in peers]).mean(0)
        return kl(probs.clamp_min(1e-12).log(), own)
    return torch.stack([kl(p, own) for p in peers]).mean()


@dataclasses.dataclass
class DML(Mode):
    """Deep mutual learning; ``peer_target`` as :func:`peer_kl`."""

    peer_target: str = "mean"

    def loss(self, i, logits, labels, cohort, teacher=None) -> LossTerms:
        ce = self.ce(logits[cohort.own_path(i)], labels)
        k = peer_kl(i, logits, cohort, self.peer_target)
        return LossTerms({"ce": ce, "kl": k}, 0.5 * ce + 0.5 * k)


@dataclasses.dataclass
class XML(Mode):
    """Cross mutual learning; ``cross='single'`` keeps the paths one part away from the student's own;
    ``cross_weight`` scales the cross-path terms; ``peer_target`` as :func:`peer_kl`."""

    cross: str = "all"
    cross_weight: float = 1.0
    peer_target: str = "mean"

    def __post_init__(self) -> None:
        if self.cross not in ("all", "single"):
            raise XrossError(f"unknown cross '{self.cross}'; choose all or single")

    def cross_paths(self, cohort: Cohort, i: int, j: int) -> list[Route]:
        return cohort.cross_paths(i, j, single=self.cross == "single")

    def paths(self, cohort: Cohort) -> list[Route]:
        needed = dict.fromkeys(super().paths(cohort))
        for i in range(cohort.num_nets):
            for j in range(cohort.num_nets):
                if i != j:
                    needed.update(dict.fromkeys(self.cross_paths(cohort, i, j)))
        return list(needed)

    def loss(self, i, logits, labels, cohort, teacher=None) -> LossTerms:
        terms = {
            "ce": self.ce(logits[cohort.own_path(i)], labels),
            "kl": peer_kl(i, logits, cohort, self.peer_target),
        }
        n_cross = 0
        for j in range(cohort.num_nets):
            if j == i:
                continue
            target = logits[cohort.own_path(j)]
            for path in self.cross_paths(cohort, i, j):
                terms[f"kl@{_path_tag(path)}"] = kl(target, logits[path])
                terms[f"ce@{_path_tag(path)}"] = self.ce(logits[path], labels)
            n_cross = len(self.cross_paths(cohort, i, j))
        own = terms["ce"] + terms["kl"]
        cross = torch.stack([v for k, v in terms.items() if "@" in k]).sum()
        total = (own + self.cross_weight * cross) / (n_cross * (cohort.num_nets - 1))
        return LossTerms(terms, total)


def check_peers(config: Any) -> None:
    """A mutual method's checks of a config: peers to learn from, a peer target that differs from the mean."""
    if len(config.nets) < 2:
        raise ValueError(f"mode {config.mode} learns from peers: give at least two nets in --nets (else independent)")
    if config.peer_target == "ensemble" and len(config.nets) < 3:
        raise ValueError("with two nets peer_target ensemble equals mean (one peer); give three or more nets")


def check_cross(config: Any) -> None:
    """XML's checks: :func:`check_peers`, and cross paths that ``cross="single"`` makes differ from all."""
    check_peers(config)
    if config.cross == "single" and len(config.cuts) < 2:
        raise ValueError("with two parts cross single equals all; cut twice (--cut A --cut B) for it to differ")


# --- distillation (xross distill; MEAL V2) ------------------------------------------------------


def soft_cross_entropy(
    student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``-sum_c q_c log softmax(s / T)_c`` averaged over the batch; ``q`` (a distribution) is detached.

    It differs from ``KL(q || softmax(s / T))`` by the entropy of ``q`` alone, so both give
    the student the same gradient; MEAL V2 trains with this form.
    """
    log_p = F.log_softmax(upcast(student_logits) / temperature, dim=1)
    return -(target_probs.detach().to(log_p) * log_p).sum(1).mean()


@dataclasses.dataclass
class DistillLoss:
    """``soft_weight * T^2 * soft_cross_entropy(s, q, T) + hard_weight * CE(s, y)``.

    ``q`` is the teachers' ensemble distribution at temperature T (:func:`xross.run.teachers.ensemble_probs`);
    the ``T^2`` factor keeps the soft term's gradient scale independent of T (Hinton et al.).
    Terms with weight 0 are not computed.
    """

    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    label_smoothing: float = 0.0

    def __call__(self, student_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor) -> LossTerms:
        terms: dict[str, torch.Tensor] = {}
        total = student_logits.new_zeros((), dtype=upcast(student_logits).dtype)
        if self.soft_weight:
            terms["soft"] = soft_cross_entropy(student_logits, target_probs, self.temperature) * self.temperature**2
            total = total + self.soft_weight * terms["soft"]
        if self.hard_weight:
            terms["ce"] = hard_label_ce(student_logits, labels, self.label_smoothing)
            total = total + self.hard_weight * terms["ce"]
        return LossTerms(terms, total)
