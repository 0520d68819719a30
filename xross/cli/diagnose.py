"""``xross diagnose`` and ``xross similarity``: why a cohort's training helped or not (flatness, entropy,
embeddings) and how alike its nets are where they are cut (linear CKA, own vs cross loss terms).
Registered on the ``xross`` app by :mod:`xross.cli.main`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgery.cli.kit import console, table
from xross.analysis.diagnose import (
    EMBEDDING_PNG,
    FLATNESS_PNG,
    NOISE_SCALES,
    DiagnoseReport,
    diagnose,
    embedding_plot,
    flatness_plot,
)
from xross.analysis.similarity import SIMILARITY_PNG, similarity_plot, similarity_report
from xross.cli.common import NoVerifyOpt, RunArg, TrustOpt
from xross.errors import XrossError
from xross.run.directory import evaluation_batches, load_run
from xross.run.metrics import read_metrics

ImagesOpt = Annotated[int, typer.Option("--images", help="test images used (a stratified subset)", min=1)]


def diagnose_command(
    run: RunArg,
    images: ImagesOpt = 1000,
    scales: Annotated[str, typer.Option(help="weight-noise scales: std of the noise / std of the tensor")] = ",".join(
        map(str, NOISE_SCALES)
    ),
    draws: Annotated[int, typer.Option(help="noisy copies averaged at each scale", min=1)] = 3,
    seed: Annotated[int, typer.Option(help="seed of the noise")] = 0,
    trust_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Flatness (top-1 and loss of every path under weight noise), mean prediction entropy of each net, and a
    PCA plot of the features at each cut; writes diagnose.json, flatness.png and embedding.png."""
    try:
        noise = [float(s) for s in scales.split(",")]
    except ValueError:
        raise XrossError(f"--scales '{scales}' should be numbers like 0.01,0.02,0.05,0.1") from None
    if not noise or not all(s > 0 for s in noise):
        raise XrossError(f"--scales '{scales}' should be positive numbers like 0.01,0.02,0.05,0.1")
    cfg, cohort = load_run(run, trust_code=trust_code, verify=not no_verify)
    batches = evaluation_batches(cfg, images)
    console.print(f"{run}: {len(noise)} noise scales x {draws} draws on {sum(len(y) for _, y in batches)} images")
    report = diagnose(cohort, batches, noise, draws, seed)
    report.save(run)
    _print_diagnose(run, report)
    written = [
        p
        for p in (flatness_plot(report, run / FLATNESS_PNG), embedding_plot(cohort, batches, run / EMBEDDING_PNG))
        if p
    ]
    console.print(f"wrote {', '.join(str(p) for p in [run / 'diagnose.json', *written])}", highlight=False)


def _print_diagnose(run: Path, report: DiagnoseReport) -> None:
    columns = ["path", *(f"top-1 @ {s:g}" for s in report.scales), *(f"loss @ {s:g}" for s in report.scales[1:2])]
    rows = [
        (name, *(f"{row[p]:.2f}" for row in report.top1), *(f"{row[p]:.3f}" for row in report.loss[1:2]))
        for p, name in enumerate(report.names)
    ]
    console.print(table(f"{run}: flatness ({report.images} images, mean of {report.draws} draws)", columns, rows))
    nets = [name for name, path in zip(report.names, report.paths) if len(set(path)) == 1]
    console.print(
        table(
            "mean prediction entropy (nats)",
            ["net", "entropy"],
            [(n, f"{e:.3f}") for n, e in zip(nets, report.entropy)],
        )
    )
    console.print(
        f"top-1 lost at the middle noise scale (mean over the nets): {report.noise_drop:.2f}", highlight=False
    )


def similarity_command(
    run: RunArg,
    images: ImagesOpt = 1000,
    trust_code: TrustOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Linear CKA between the nets' features at every cut (and through each adapter), and each net's own-path vs
    cross-path loss terms over training from steps.csv (CKA per epoch when trained with --cka-images); writes
    similarity.json and similarity.png."""
    cfg, cohort = load_run(run, trust_code=trust_code, verify=not no_verify)
    report = similarity_report(cohort, [x for x, _ in evaluation_batches(cfg, images)])
    report.save(run)
    rows = [(key, f"{value:.4f}") for key, value in report.cka.items()]
    title = f"{run}: linear CKA ({report.images} images; b<cut>_<i>v<j>: net i vs net j, <i>to<j>: through the adapter)"
    console.print(table(title, ["boundary", "CKA"], rows))
    png = similarity_plot(report, read_metrics(run, "steps"), read_metrics(run, "epochs"), run / SIMILARITY_PNG)
    written = [run / "similarity.json", *([png] if png else [])]
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)
