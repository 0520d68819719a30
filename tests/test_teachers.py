"""xross.run.teachers: references to teachers, a cohort's paths through shared prefixes, ensemble targets."""

from __future__ import annotations

import pytest
import torch

import surgery
from xross.cohort.grid import Cohort
from xross.errors import XrossError
from xross.run.checkpoint import CheckpointDir, read_checkpoint
from xross.run.teachers import Teachers, check_classes, ensemble_logits, ensemble_probs, load_teachers


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


def test_a_hugging_face_classifier_distils_as_teacher_and_as_student(tmp_path, cli, data_cache) -> None:
    """ViTForImageClassification returns an ImageClassifierOutput: teachers and students take its .logits."""
    from transformers import ViTConfig, ViTForImageClassification

    from xross.data.synthetic import write_synthetic
    from xross.run.evaluate import EvalResult

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    hf = surgery.refs.load(f"hf:{tmp_path / 'vit'}").eval()
    teachers, _ = load_teachers([f"hf:{tmp_path / 'vit'}"])
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teachers(x)[0], hf(x).logits)
    check_classes(teachers, 3, 32, torch.float32, "the data")

    data = write_synthetic(tmp_path / "data", train_per_class=4, test_per_class=2, classes=("a", "b", "c"))
    run, vit = tmp_path / "run", f"hf:{tmp_path / 'vit'}"  # the classifier distils into a copy of itself
    r = cli("xross", "distill", "--student", vit, "--teacher", vit, "--data", data, "--epochs", "1", "--batch-size",
            "4", "--lr", "1e-3", "--cache-dir", data_cache, "--out", run, "--no-progress")  # fmt: skip
    assert r.code == 0, r
    result = EvalResult.load(run / "eval.json")
    assert [p.role for p in result.paths] == ["student", "teacher"] and result.samples == 6
    assert (run / "steps.csv").read_text().splitlines()[-1].startswith("3,1,3,")  # 12 images, batches of 4
    student = surgery.refs.load(str(run / "student-init"))
    trained = read_checkpoint(CheckpointDir(run).latest())["student"]
    assert torch.equal(student.state_dict()["classifier.weight"], hf.state_dict()["classifier.weight"])
    assert not torch.equal(trained["classifier.weight"], hf.state_dict()["classifier.weight"])  # it learned
    with pytest.raises(surgery.SurgeryError, match=r"has 3 labels \(num_labels in its config.json\), not the 10"):
        surgery.refs.load(vit, num_classes=10)  # a student for 10 classes cannot be this classifier
    with pytest.raises(XrossError, match=r"a teacher returns a dict \(keys: features\), not logits; give a model"):
        Teachers([DictOut()], [None], ["dict"])(x)


class DictOut(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": x.mean((2, 3))}
