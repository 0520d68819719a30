"""xross.teachers: references to teachers, a cohort's paths through shared prefixes, ensemble targets."""

from __future__ import annotations

import pytest
import torch

import surgery
from xross.cohort import Cohort
from xross.errors import XrossError
from xross.teachers import Teachers, check_classes, ensemble_logits, ensemble_probs, load_teachers


def test_a_cohorts_paths_match_each_path_run_alone(cohort: Cohort) -> None:
    paths = cohort.paths()
    teachers = Teachers([cohort], [paths], [str(p) for p in paths])
    x = torch.randn(4, 3, 16, 16)
    outputs = teachers(x)
    assert teachers.training is False and not any(p.requires_grad for p in teachers.parameters())
    teachers.train()  # stays in eval mode: BatchNorm statistics of a teacher never move
    assert teachers.training is False and not cohort.training
    for path, out in zip(paths, outputs):
        assert torch.equal(out, cohort(x, path)), path
    assert [m[2] for m in teachers.members()] == paths


def test_ensemble_targets_weighted_means() -> None:
    a, b = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.0, 3.0, 1.0]])
    w = torch.tensor([1.0, 3.0])
    expected = (1 * (a / 2).softmax(1) + 3 * (b / 2).softmax(1)) / 4
    assert torch.allclose(ensemble_probs([a, b], 2.0, w), expected)
    assert torch.allclose(ensemble_logits([a, b], w), (a + 3 * b) / 4)


def test_saved_models_and_references_as_teachers(tmp_path) -> None:
    torch.manual_seed(0)
    net = surgery.build_model("growth.models:small_vgg", widths=[8, 16], num_classes=10, image_size=16)
    surgery.save(net, tmp_path / "t")
    weights_file = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(net.state_dict(), weights_file)
    teachers, weights = load_teachers(
        [str(tmp_path / "t"), f"growth.models:small_vgg(widths=[8, 16], image_size=16, weights='{weights_file}')"],
        weights=[1, 2],
    )
    x = torch.randn(2, 3, 16, 16)
    first, second = teachers(x)
    assert torch.equal(first, net.eval()(x)) and torch.equal(second, first)
    assert weights.tolist() == [1.0, 2.0]
    check_classes(teachers, 10, 16, torch.float32, "the data")
    with pytest.raises(XrossError, match="gives outputs of shape \\(2, 10\\) but the data has 100 classes"):
        check_classes(teachers, 100, 16, torch.float32, "the data")
    with pytest.raises(XrossError, match="no teachers given"):
        load_teachers([])
    with pytest.raises(XrossError, match="non-negative with a positive sum"):
        load_teachers([str(tmp_path / "t")], weights=[0])
