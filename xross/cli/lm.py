"""The command line of causal-LM runs (``--task causal_lm``): their result tables and ``xross eval``.

A causal-LM cohort's table has, per path, the mean next-token cross-entropy on the held-out windows,
its perplexity (``exp`` of it), the next token's top-1, parameters and FLOPs per window.
"""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.graph.flops import FLOPS_COLUMN, human
from xross.cohort.grid import Cohort
from xross.cohort.grow import grow_net
from xross.cohort.lm_cohort import lm_cohort
from xross.data.text import TokenLoader, load_text, load_tokenizer
from xross.run.config import TrainConfig
from xross.run.directory import DTYPES, _with_latest_weights
from xross.run.evaluate import EvalResult, evaluate_lm, pareto_front
from xross.run.growing import GrowthEntry
from xross.run.table import ResultTable


def window_input(cfg: TrainConfig) -> str:
    """What a causal-LM run's FLOPs are counted on: one window of token ids."""
    return f"int64:1x{cfg.seq_len} (one window of {cfg.seq_len} token ids)"


def lm_tables(cfg: TrainConfig, result: EvalResult, run: Path) -> list[ResultTable]:
    """A causal-LM run's evaluation: its paths (loss, perplexity, next-token top-1, cost) and ensembles."""
    front = {r.path for r in pareto_front(result.paths)}
    rows = [
        (
            ",".join(map(str, r.path)),
            r.name,
            f"{r.loss:.4f}",
            f"{r.perplexity:.2f}",
            f"{r.top1:.2f}",
            human(r.params),
            human(r.flops),
            "*" if r.path in front else "",
        )
        for r in sorted(result.paths, key=lambda r: r.params)
    ]
    columns = ["path", "parts", "loss", "perplexity", "top-1 token", "params", FLOPS_COLUMN, "pareto"]
    title = f"paths of {run} ({result.samples} tokens of the {result.split or 'held-out'} windows)"
    tables = [ResultTable(title, columns, rows, flops_on=window_input(cfg))]
    if len(result.paths) > 1:
        ens = [(k, f"{v.loss:.4f}", f"{v.perplexity:.2f}", f"{v.top1:.2f}") for k, v in result.ensembles.items()]
        tables.append(ResultTable("ensembles (mean softmax)", ["members", "loss", "perplexity", "top-1 token"], ens))
    return tables


def eval_lm_run(run: Path, cfg: TrainConfig, batch_size: int, *, trust_code: bool, verify: bool) -> EvalResult:
    """``xross eval`` of a causal-LM run: its newest weights on its held-out windows (as the run split them)."""
    _, vocab = load_tokenizer(cfg.tokenizer)
    cohort = lm_cohort(cfg, vocab, torch.device("cpu"), trust_code=trust_code).to(DTYPES[cfg.dtype])

    def regrow(cohort: Cohort, growths: list[GrowthEntry]) -> Cohort:
        for entry in growths:
            for net, steps in entry.steps().items():
                grow_net(cohort, net, steps, 0)
        return cohort

    cohort = _with_latest_weights(run, cohort, "cohort", cfg, verify, regrow)
    _, test, _ = load_text(
        cfg.data, cfg.seq_len, tokenizer=cfg.tokenizer, eval_fraction=cfg.eval_fraction, seed=cfg.seed
    )
    batches = TokenLoader(test, batch_size, train=False).epoch(0)
    return evaluate_lm(cohort, batches).model_copy(update={"split": test.split})
