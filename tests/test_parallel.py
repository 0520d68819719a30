"""xross.run.parallel: cohorts on PyTorch's engines under torchrun (2 gloo processes on CPU).

DDP and FSDP2 runs of a dml and an xml cohort (the alternate schedule's per-student backward passes, and the
joint schedule's one) equal one process's to 1e-9 in float64 after several steps; they resume bit for bit, and
an FSDP2 run's checkpoint (gathered on rank 0) resumes on another number of processes. Engines that cannot
run a step are refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, final_state, finish, xross
from test_distributed import torchrun
from torch import nn

from xross.run.evaluate import EvalResult
from xross.run.parallel import leaves_reached

VGG = "growth.models:small_vgg(widths=[8, 16], image_size=8)"


def cohort_args(archive: Path, cache: Path, mode: str, schedule: str, epochs: int) -> list[str]:
    """Two small VGGs cut after their first stage, 4 steps of 16 images an epoch, float64."""
    return [
        "train", "--nets", f"{VGG},{VGG}", "--cut", "features.0", "--mode", mode, "--schedule", schedule,
        "--data", str(archive), "--cache-dir", str(cache), "--subset", "64", "--batch-size", "16",
        "--image-size", "8", "--eval-subset", "16", "--dtype", "float64", "--optimizer", "sgd", "--lr", "0.05",
        "--epochs", str(epochs), "--eval-every", "0", "--no-progress",
    ]  # fmt: skip


def one_process(args: list[str], out: Path) -> None:
    code, _, err = finish(xross(*args, "--out", str(out)))
    assert code == 0, err


def worst_difference(a: Path, b: Path) -> float:
    one, two = final_state(a), final_state(b)
    assert one["position"] == two["position"]
    return max((one["cohort"][k] - two["cohort"][k]).abs().max().item() for k in one["cohort"])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_xml_on_an_engine_matches_one_process_and_resumes_bit_for_bit(
    tmp_path, synthetic_archive, data_cache, engine
) -> None:
    args = cohort_args(synthetic_archive, data_cache, "xml", "alternate", epochs=2)
    one_process(args, tmp_path / "one")
    err = torchrun(*args, "--parallel", engine, "--out", str(tmp_path / "straight"))
    assert f"parallel: {engine}" in err  # the run says which engine it is on
    if engine == "fsdp":
        assert "(4 units fully_shard-ed)" in err  # every piece of both nets; shape-matching adapters have none
    assert final_state(tmp_path / "straight")["position"]["global_step"] == 8
    assert worst_difference(tmp_path / "one", tmp_path / "straight") <= 1e-9

    half = [a if a != "2" or args[i - 1] != "--epochs" else "1" for i, a in enumerate(args)]
    torchrun(*half, "--parallel", engine, "--out", str(tmp_path / "resumed"))
    torchrun("train", "--resume", "--out", str(tmp_path / "resumed"), "--epochs", "2", "--no-progress")
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert a["position"] == b["position"]
    assert_same_tensors(a["cohort"], b["cohort"])
    assert (tmp_path / "straight" / "steps.csv").read_text() == (tmp_path / "resumed" / "steps.csv").read_text()
    if engine == "fsdp":  # gathered on rank 0: the same file as one process's, and its optimiser state resumes there
        assert a["cohort"].keys() == final_state(tmp_path / "one")["cohort"].keys()
        assert all(isinstance(k, str) for k in a["optimizer"]["state"])  # named, not numbered, parameters
        torchrun(*half, "--parallel", engine, "--out", str(tmp_path / "elsewhere"))
        code, _, err = finish(xross("train", "--resume", "--out", str(tmp_path / "elsewhere"), "--epochs", "2"))
        assert code == 0, err
        assert worst_difference(tmp_path / "one", tmp_path / "elsewhere") <= 1e-9


@pytest.mark.slow
def test_dml_joint_on_both_engines_matches_one_process(tmp_path, synthetic_archive, data_cache) -> None:
    args = cohort_args(synthetic_archive, data_cache, "dml", "joint", epochs=1)
    one_process(args, tmp_path / "one")
    for engine in ("ddp", "fsdp", "manual"):
        torchrun(*args, "--parallel", engine, "--out", str(tmp_path / engine))
        assert worst_difference(tmp_path / "one", tmp_path / engine) <= 1e-9, engine
    initial = final_state(tmp_path / "one")  # the comparison means something: training moved the weights
    assert initial["position"]["global_step"] == 4


REFUSED = {
    "one process": (["--mode", "dml"], ["--parallel", "fsdp"], "it applies under torchrun (WORLD_SIZE > 1)"),
    "mutualnet": (["--mode", "mutualnet"], ["--parallel", "fsdp"], "this method's step runs on ddp or manual"),
    "growth": (["--mode", "dml", "--cut", "features.0"], ["--parallel", "fsdp", "--grow", "0.5:net2wider:all"],
               "a growth rebuilds the nets"),
    "unknown": (["--mode", "dml"], ["--parallel", "bogus"], "parallel"),
}  # fmt: skip


@pytest.mark.parametrize(("base", "extra", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_an_engine_that_does_not_apply_is_refused_in_one_line(
    tmp_path, synthetic_archive, data_cache, base, extra, message
) -> None:
    nets = f"{VGG},{VGG}" if "dml" in base else VGG
    args = ["train", "--nets", nets, *base, "--data", str(synthetic_archive), "--cache-dir", str(data_cache)]
    args += ["--subset", "32", "--image-size", "8", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]
    code, out, err = finish(xross(*args, *extra))
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_leaves_reached_are_the_parameters_a_backward_pass_accumulates_into() -> None:
    a, b, c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
    x = torch.randn(2, 3)
    loss = (b(a(x)) + c(x).detach()).sum()  # c is computed, but only detached
    reached = leaves_reached(loss)
    assert reached == {id(p) for p in [*a.parameters(), *b.parameters()]}
    loss.backward()
    assert all(p.grad is not None for p in [*a.parameters(), *b.parameters()])
    assert all(p.grad is None for p in c.parameters())


LLAMA = (
    'hf:LlamaForCausalLM(config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, '
    '"num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 256})'
)


@pytest.mark.slow
def test_causal_lm_cohort_sharded_by_fsdp_matches_one_process(tmp_path, data_cache) -> None:
    """Two LLaMAs (GQA, RoPE) in xml, each cut after its first layer and sharded piece by piece; the text ends
    in a short window, so the ranks hold different numbers of tokens in one of the batches: the loss is still
    the mean over every rank's tokens, and so the run equals one process's."""
    from xross.data.labels import UNLABELED
    from xross.data.text import TokenLoader, load_text

    corpus = tmp_path / "text"
    corpus.mkdir()
    (corpus / "a.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(36)))
    train, _, _ = load_text(f"text:{corpus}", 32)
    halves = [TokenLoader(train, 16, rank=r, world_size=2, device=torch.device("cpu"), seed=0) for r in (0, 1)]
    counts = [[int((y != UNLABELED).sum()) for _, y in half.epoch(0)] for half in halves]
    assert counts[0] != counts[1]  # the short window is in a training batch: its halves hold different counts
    args = ["train", "--task", "causal_lm", "--mode", "xml", "--nets", f"{LLAMA},{LLAMA}", "--cut", "block:0"]
    args += ["--data", f"text:{corpus}", "--seq-len", "32", "--batch-size", "16", "--epochs", "1", "--dtype"]
    args += ["float64", "--optimizer", "sgd", "--lr", "0.05", "--no-progress", "--cache-dir", str(data_cache)]
    one_process(args, tmp_path / "one")
    err = torchrun(*args, "--parallel", "fsdp", "--out", str(tmp_path / "fsdp"))
    assert "parallel: fsdp (4 units fully_shard-ed)" in err
    assert worst_difference(tmp_path / "one", tmp_path / "fsdp") <= 1e-9
    e1, e2 = (EvalResult.load(tmp_path / run / "eval.json") for run in ("one", "fsdp"))
    assert e1.samples == e2.samples
    for a, b in zip(e1.paths, e2.paths):
        assert a.path == b.path and abs(a.perplexity - b.perplexity) <= 1e-9 * a.perplexity
