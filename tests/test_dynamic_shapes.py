"""Pieces take every size their model takes: a graph torch.export fixed is captured again per shape (surgery.recut).

Models are built from small configs with random weights (no downloads).
"""

from __future__ import annotations

import warnings

import torch
import transformers

import surgery

transformers.logging.set_verbosity_error()


def test_a_state_space_model_fixed_at_one_length_says_so_and_its_pieces_take_other_lengths() -> None:
    config = {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "intermediate_size": 64, "vocab_size": 120}
    mamba = surgery.build_model("hf:MambaForCausalLM", config=config).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pieces = surgery.cut(mamba, "backbone.layers.0")  # its scan loops over the tokens: export unrolls it
    said = [str(w.message) for w in caught if "torch.export fixed" in str(w.message)]
    assert said == [
        "MambaForCausalLM: torch.export fixed input_ids dim 1 = 16 (the model's code needs it there); "
        "the pieces capture again for each other size they are called with"
    ]
    for length, notes in ((7, 1), (23, 1), (7, 0)):  # 7 again: the graph captured for it is kept
        ids = torch.randint(1, 120, (3, length))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pieces(ids).logits
        assert torch.equal(out, mamba(ids, use_cache=False).logits)
        assert len([w for w in caught if "capturing again for those sizes" in str(w.message)]) == notes
    assert len(pieces._recut.cache) == 2


def test_swin_cut_without_an_example_takes_a_batch_of_one_and_of_three() -> None:
    config = {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2]}
    swin = surgery.build_model("hf:SwinForImageClassification", config={**config, "window_size": 4}).eval()
    pieces = surgery.cut(swin, "swin.encoder.layers.0")  # guessed: one 32x32 image, captured as a batch of 2
    assert [s.shape for s in pieces.infos()[0].origin.inputs] == [[2, 3, 32, 32]]
    for batch in (1, 3):  # export assumed a batch is not 1: the batch of one gets a graph of its own
        x = torch.randn(batch, 3, 32, 32)
        assert torch.equal(pieces(x).logits, swin(x).logits)
