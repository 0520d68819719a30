"""How alike the nets of a cohort are where they are cut: linear CKA of their features at every boundary.

Linear centred kernel alignment (Kornblith et al., ICML 2019) compares two sets of features of the
same N images, whatever their widths: with ``K = X X^T`` and ``L = Y Y^T`` computed from centred
features, ``CKA = <K, L> / (|K| |L|)`` (Frobenius). It is 1 for features that are a rotation or an
isotropic scaling of each other and near 0 for unrelated ones. Computed on N x N Gram matrices, so
wide feature maps (128 x 8 x 8 = 8,192 numbers per image) cost nothing extra.

>>> import torch
>>> x = torch.randn(50, 8, dtype=torch.float64)
>>> q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
>>> round(linear_cka(x, x @ q), 6), round(linear_cka(x, 3 * x), 6)
(1.0, 1.0)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from surgery.core.schema import FileModel, Float
from surgery.core.util import atomic_write_text, evaluating
from xross.analysis.plots import pyplot, save_png
from xross.cohort.exits import feature
from xross.cohort.grid import Cohort

SIMILARITY_JSON, SIMILARITY_PNG = "similarity.json", "similarity.png"


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature sets of the same images (first dimension), any shapes beyond it."""
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    x = x - x.mean(0)
    y = y - y.mean(0)
    k, lg = x @ x.T, y @ y.T
    denominator = k.norm() * lg.norm()
    return float((k * lg).sum() / denominator) if denominator > 0 else 0.0


@torch.no_grad()
def boundary_features(cohort: Cohort, images: Iterable[torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    """Each net's own features after each part but the last: ``{(net, boundary): (N, ...)}``."""
    out: dict[tuple[int, int], list[torch.Tensor]] = {}
    with evaluating(cohort):
        for x in images:
            values: dict = {}
            cohort.forward_paths(x, [cohort.own_path(i) for i in range(cohort.num_nets)], prefixes=values)
            for i in range(cohort.num_nets):
                for b in range(cohort.num_parts - 1):
                    out.setdefault((i, b), []).append(feature(values[(i,) * (b + 1)]))
    return {key: torch.cat(chunks) for key, chunks in out.items()}


@torch.no_grad()
def cohort_cka(cohort: Cohort, images: Iterable[torch.Tensor]) -> dict[str, float]:
    """Linear CKA between every pair of nets at every boundary, keyed ``b0_0v1``; with an adapter between
    them also ``b0_0to1`` (what the adapter hands net 1, against net 1's own features)."""
    feats = boundary_features(cohort, images)
    result = {}
    for b in range(cohort.num_parts - 1):
        for i, j in itertools.combinations(range(cohort.num_nets), 2):
            result[f"b{b}_{i}v{j}"] = linear_cka(feats[i, b], feats[j, b])
        for i, j in itertools.permutations(range(cohort.num_nets), 2):
            adapter = cohort.adapter(b, i, j)
            if adapter is not None:
                with evaluating(adapter):
                    handed = torch.cat([feature(adapter(chunk)) for chunk in feats[i, b].split(256)])
                result[f"b{b}_{i}to{j}"] = linear_cka(handed, feats[j, b])
    return result


class SimilarityReport(FileModel):
    """``similarity.json``: linear CKA at every cut of a run's cohort (keys as :func:`cohort_cka`)."""

    format_version: Literal[1] = 1
    images: int
    names: list[str]
    cka: dict[str, Float]

    def save(self, run: Path) -> None:
        atomic_write_text(run / SIMILARITY_JSON, self.model_dump_json(indent=1) + "\n")


def similarity_report(cohort: Cohort, images: list[torch.Tensor]) -> SimilarityReport:
    return SimilarityReport(
        images=sum(len(x) for x in images), names=list(cohort.names), cka=cohort_cka(cohort, images)
    )


OWN_TERMS, CROSS_TERMS = ("ce", "kl", "kd", "exits"), ("cross_ce", "cross_kl", "cross")


def loss_term_curves(steps: list[dict[str, float]], num_nets: int) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """Per-term loss curves from a run's ``steps.csv`` rows: ``{(term, net): [(step, value), ...]}`` for the
    own-path terms and the cross-path ones (``cross_ce``, ``cross_kl``; ``cross``, their sum, in older runs)."""
    curves: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for k, row in enumerate(steps):
        for term in (*OWN_TERMS, *CROSS_TERMS):
            for i in range(num_nets):
                if f"{term}{i}" in row:
                    curves.setdefault((term, i), []).append((row.get("global_step", k), row[f"{term}{i}"]))
    return curves


def similarity_plot(
    report: SimilarityReport, steps: list[dict[str, float]], epochs: list[dict[str, float]], path: Path
) -> Path | None:
    """Left: each net's own-path and cross-path loss terms over training; right: CKA per epoch (when the run
    logged it, ``cka_images``) or at the end. None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (term, net), points in loss_term_curves(steps, len(report.names)).items():
        style = "--" if term in CROSS_TERMS else "-"
        left.plot(*zip(*points), label=f"{term} ({report.names[net]})", linestyle=style)
    left.set_xlabel("step")
    left.set_ylabel("loss term (unweighted)")
    left.set_title("own-path terms (solid), cross-path terms: mean over the cross paths (dashed)", fontsize=9)
    if left.lines:
        left.legend(fontsize=7)
    keys = [k for k in (epochs[-1] if epochs else {}) if k.startswith("cka_")]
    if keys:
        for key in keys:
            points = [(row["epoch"], row[key]) for row in epochs if key in row]
            right.plot(*zip(*points), marker="o", label=key[4:])
        right.set_xlabel("epoch")
    else:
        right.bar(range(len(report.cka)), list(report.cka.values()), tick_label=list(report.cka))
    right.set_ylim(0, 1.05)
    right.set_ylabel("linear CKA")
    right.set_title(f"linear CKA at each cut, {report.images} test images", fontsize=9)
    if keys:
        right.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)
