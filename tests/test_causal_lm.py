"""--task causal_lm: cohorts of small decoders (LLaMA, GPT-2) trained on a folder of text files.

Windows and split (every byte in exactly one window, hence one split; deterministic in the seed), a run that
learns and whose perplexity is exp of the mean token CE computed directly, a resume bit for bit, dml of a
LLaMA and a GPT-2, xml of two LLaMAs with per-path perplexities, a saved tokenizer, and the refusals.
"""

from __future__ import annotations

import math
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import assert_same_tensors, final_state

import xross
from xross.cli.lm import eval_lm_run
from xross.cohort.lm_cohort import lm_cohort, refuse_unstitched
from xross.data.text import TokenLoader, held_out, load_text, read_texts, windows
from xross.errors import Interrupted, XrossError
from xross.methods.objectives import XML
from xross.methods.trainer import Trainer
from xross.run.directory import _with_latest_weights
from xross.run.engine import RunEngine
from xross.run.evaluate import EvalResult, evaluate_lm
from xross.run.growing import read_log

transformers.logging.set_verbosity_error()
LLAMA = (
    'hf:LlamaForCausalLM(config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, '
    '"num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 256})'
)
LLAMA3 = LLAMA.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3').replace(
    '"intermediate_size": 64', '"intermediate_size": 48'
)
GPT2 = 'hf:GPT2LMHeadModel(config={"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 256, "n_positions": 64})'
SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~2 kB of text in .txt, .md and .py files (one nested), plus files that are skipped: binary, not listed."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and then it runs far away".split()
    (root / "notes").mkdir()
    for name in ("a.txt", "notes/b.md", "c.txt"):
        (root / name).write_text(" ".join(rng.choice(words) for _ in range(120)) + "\n")
    (root / "code.py").write_text("def inc(x):\n    return x + 1\n" * 12)
    (root / "blob.txt").write_bytes(bytes(range(256)))  # binary: skipped
    (root / "data.json").write_text('{"not": "listed"}')  # not a text suffix: skipped
    return root


def _options(corpus: Path, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    options = dict(task="causal_lm", nets=[LLAMA], mode="independent", data=f"text:{corpus}", seq_len=SEQ)
    options.update(batch_size=16, epochs=1, lr=3e-3, device="cpu", eval_every=0, out=str(tmp_path / "run"))
    return {**options, **kw}


def _flat_tokens(rows: torch.Tensor) -> list[int]:
    return [t for t in rows.flatten().tolist() if t >= 0]


# --- windows and split ---------------------------------------------------------------------------------


def test_byte_windows_hold_every_byte_once_and_the_split_is_seeded(corpus: Path) -> None:
    texts = read_texts(corpus)
    assert len(texts) == 4 and bytes(range(256)) not in texts  # a.txt, notes/b.md, c.txt, code.py
    stream = b"".join(texts)
    train, test, vocab = load_text(f"text:{corpus}", SEQ, eval_fraction=0.2, seed=3)
    assert vocab == 256 and train.inputs.shape[1] == test.targets.shape[1] == SEQ
    rows = windows(torch.tensor(list(stream)), SEQ)
    mask = held_out(len(rows), 0.2, 3)
    assert torch.equal(train.tokens, rows[~mask]) and torch.equal(test.tokens, rows[mask])
    assert _flat_tokens(rows) == list(stream)  # the windows, in order, are the corpus: each byte once
    assert len(test) == round(0.2 * len(rows)) and len(train) + len(test) == len(rows)
    again = load_text(f"text:{corpus}", SEQ, eval_fraction=0.2, seed=3)
    assert torch.equal(again[0].tokens, train.tokens) and torch.equal(again[1].tokens, test.tokens)
    other = load_text(f"text:{corpus}", SEQ, eval_fraction=0.2, seed=4)[1]
    assert not torch.equal(other.tokens, test.tokens)
    last = rows[-1]  # the padded window: inputs 0, targets -1 where the corpus ended
    pad = int((last < 0).sum())
    assert pad == (SEQ + 1) * len(rows) - len(stream)
    assert torch.equal(train.inputs, train.tokens[:, :-1].clamp_min(0))
    assert torch.equal(train.targets, train.tokens[:, 1:])


def test_a_saved_tokenizer_reads_the_same_corpus(corpus: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [t.decode() for t in read_texts(corpus)], trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    train, test, vocab = load_text(f"text:{corpus}", 8, tokenizer=f"hf:{tmp_path / 'tok'}", seed=0)
    assert vocab == len(fast) < 256
    ids = [i for text in read_texts(corpus) for i in fast(text.decode(), add_special_tokens=False)["input_ids"]]
    assert sorted(_flat_tokens(train.tokens) + _flat_tokens(test.tokens)) == sorted(ids)


# --- training, evaluation, resumption --------------------------------------------------------------------


def test_a_run_learns_and_its_perplexity_is_exp_of_the_mean_token_ce(corpus: Path, tmp_path: Path) -> None:
    config = xross.TrainConfig(**_options(corpus, tmp_path, epochs=2))
    _, test, _ = load_text(config.data, SEQ, seed=config.seed)
    cohort = lm_cohort(config, 256, torch.device("cpu"))  # seeded as the run starts: the untrained net
    untrained = evaluate_lm(cohort, TokenLoader(test, 64, train=False).epoch(0)).paths[0]
    result = xross.train(config, progress=False)
    (path,) = result.paths
    assert path.loss is not None and untrained.loss is not None and path.loss < untrained.loss - 0.5
    saved = EvalResult.load(Path(config.out) / "eval.json")
    assert saved.paths[0].perplexity == path.perplexity and saved.split == "held-out"
    cohort = _with_latest_weights(Path(config.out), cohort, "cohort", config, True, lambda c, _: c)
    with torch.no_grad():
        logits = cohort.wholes[0](input_ids=test.inputs).logits  # the net as users call it
    ce = F.cross_entropy(logits.double().flatten(0, 1), test.targets.flatten(), ignore_index=-1, reduction="sum")
    scored = int((test.targets >= 0).sum())
    assert result.samples == scored and path.perplexity is not None
    assert math.isclose(path.perplexity, math.exp(float(ce) / scored), rel_tol=1e-9)


def _stop_at_step(step: int) -> Any:
    original = RunEngine._log_step

    def log_then_stop(self: RunEngine, *args: Any) -> None:
        original(self, *args)
        if self.position.global_step == step:
            self.stop_signal = signal.SIGINT

    return log_then_stop


def test_a_run_stopped_mid_epoch_resumes_bit_identically(corpus, tmp_path, monkeypatch) -> None:
    options = _options(corpus, tmp_path, epochs=2, batch_size=40, log_every=1, eval_every=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    xross.train(progress=False, **{**options, "out": str(straight)})
    with monkeypatch.context() as patch:
        patch.setattr(RunEngine, "_log_step", _stop_at_step(1))
        with pytest.raises(Interrupted, match="--resume"):
            xross.train(progress=False, **{**options, "out": str(resumed)})
    assert final_state(resumed)["position"] == {**final_state(resumed)["position"], "epoch": 0, "step": 1}
    xross.train(resume=True, progress=False, out=str(resumed))
    one, two = final_state(straight), final_state(resumed)
    assert one["position"] == two["position"] and one["position"]["global_step"] == 4  # 2 epochs of 2 steps
    assert_same_tensors(one["cohort"], two["cohort"])
    state = one["optimizer"]["state"]
    assert state.keys() == two["optimizer"]["state"].keys() and state
    for k in state:  # Adam's moments and step counts
        assert_same_tensors(state[k], two["optimizer"]["state"][k])
    for name in ("steps.csv", "epochs.csv", "eval.json"):
        assert (straight / name).read_text() == (resumed / name).read_text(), name


def test_dml_of_a_llama_and_a_gpt2_logs_each_nets_terms(corpus, tmp_path) -> None:
    config = xross.TrainConfig(**_options(corpus, tmp_path, nets=[LLAMA, GPT2], mode="dml", log_every=1, eval_every=1))
    trainer = Trainer(config, progress=False)
    result = trainer.fit()
    rows = (Path(config.out) / "steps.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"loss0", "ce0", "kl0", "acc0", "loss1", "ce1", "kl1", "acc1"} <= set(header) and len(rows) > 2
    first = dict(zip(header, rows[1].split(",")))
    for i in (0, 1):  # dml's loss: half the token CE, half the KL to the peer
        assert math.isclose(
            float(first[f"loss{i}"]), 0.5 * float(first[f"ce{i}"]) + 0.5 * float(first[f"kl{i}"]), abs_tol=2e-5
        )
    epochs = (Path(config.out) / "epochs.csv").read_text().splitlines()[0].split(",")
    assert {"loss_net0", "ppl_net0", "loss_net1", "ppl_net1", "ppl_ensemble"} <= set(epochs)
    assert [p.path for p in result.paths] == [(0, 0), (1, 1)]  # no adapter stitches the two families
    with pytest.raises(XrossError, match="xml trains stitched paths, but nets 0 and 1 at cut 0"):
        refuse_unstitched(trainer.cohort, XML().paths(trainer.cohort), "xml")


def test_a_decoder_grows_deeper_then_wider_keeping_its_function_and_eval_replays_it(corpus, tmp_path) -> None:
    grow = ["step=1:net2deeper:model.layers.0:kind=block", "step=3:net2wider:model.layers.0.mlp.up_proj:factor=2"]
    options = _options(corpus, tmp_path, epochs=2, batch_size=40, grow=grow, grow_optimizer="reset")
    config = xross.TrainConfig(**options)
    result = xross.train(config, progress=False)
    deeper, wider = read_log(Path(config.out))
    assert deeper.params_before < deeper.params_after == wider.params_before < wider.params_after
    for entry in (deeper, wider):  # the grown net computes what it computed
        assert entry.max_logit_change <= 1e-5
        assert math.isclose(entry.loss_before[0], entry.loss_after[0], rel_tol=1e-6)
    assert result.paths[0].params == wider.params_after
    again = eval_lm_run(Path(config.out), config, 64, trust_code=False, verify=True)  # replays both growths
    assert again.paths[0].perplexity == result.paths[0].perplexity
    with pytest.raises(XrossError, match="grow once, or give --grow-optimizer reset"):
        xross.TrainConfig.from_dict({**options, "grow_optimizer": "carry"})


# --- the command line -------------------------------------------------------------------------------------


def test_xml_of_two_llamas_on_the_command_line_reports_each_paths_perplexity(cli, corpus, tmp_path) -> None:
    run = tmp_path / "run"
    args = ["train", "--task", "causal_lm", "--nets", f"{LLAMA},{LLAMA3}", "--mode", "xml", "--data", f"text:{corpus}"]
    args += ["--seq-len", str(SEQ), "--batch-size", "40", "--epochs", "1", "--lr", "3e-3", "--out", str(run)]
    r = cli("xross", *args, "--no-progress")
    assert r.code == 0, r
    result = EvalResult.load(run / "eval.json")
    assert [p.path for p in result.paths] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for p in result.paths:
        assert p.perplexity is not None and math.isclose(p.perplexity, math.exp(p.loss), rel_tol=1e-12)  # type: ignore[arg-type]
    assert "perplexity" in r.out and "0,1" in r.out
    config = xross.TrainConfig.load(run / "config.yaml")
    assert config.cuts == ["block:half"] and config.task == "causal_lm"
    e = cli("xross", "eval", str(run))
    assert e.code == 0, e
    again = EvalResult.load(run / "eval.json")
    assert [p.perplexity for p in again.paths] == [p.perplexity for p in result.paths]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nets", LLAMA.replace('"vocab_size": 256', '"vocab_size": 128')], "give it vocab_size >= 256"),
        (["--tokenizer", "gpt2"], "'gpt2' is not hf:DIR"),
        (["--exits"], "exits does not apply to --task causal_lm"),
        (["--image-size", "32"], "image_size does not apply to --task causal_lm"),
        (["--grow", "step=1:net2deeper:model.layers.0:kind=block"] * 2, "grow once, or give --grow-optimizer reset"),
        (["--seq-len", "100", "--nets", GPT2], "takes 64 positions but --seq-len is 100"),
        (["--mode", "mutualnet"], "task applies to independent, dml and xml, not mutualnet"),
    ],
)
def test_refusals_are_one_line_exit_2(cli, corpus, tmp_path, extra: list[str], message: str) -> None:
    args = ["train", "--task", "causal_lm", "--nets", LLAMA, "--mode", "independent", "--data", f"text:{corpus}"]
    r = cli("xross", *args, "--seq-len", str(SEQ), "--out", str(tmp_path / "run"), "--no-progress", *extra)
    assert r.code == 2 and message in r.err, r
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "run").exists()


def test_seq_len_without_causal_lm_and_text_without_causal_lm_are_refused(cli, corpus, tmp_path) -> None:
    r = cli("xross", "train", "--seq-len", "32", "--out", str(tmp_path / "a"))
    assert r.code == 2 and "seq_len applies to --task causal_lm only" in r.err, r
    r = cli("xross", "train", "--data", f"text:{corpus}", "--out", str(tmp_path / "b"))
    assert r.code == 2 and "add --task causal_lm" in r.err, r
