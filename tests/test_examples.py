"""examples/grow_and_train.py, test-sized: growth mid-training keeps the test accuracy exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import surgery

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("grow_and_train", ROOT / "examples" / "grow_and_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_grow_and_train_keeps_accuracy_through_growth(
    real_cifar10: Path | None, data_cache: Path, tmp_path: Path, capsys
) -> None:
    """Without CIFAR10_ARCHIVE the example runs as it does without --data: on data it generates itself."""
    example = _example()
    data = ["--data", str(real_cifar10)] if real_cifar10 is not None else []
    result = example.main(
        [
            *data,
            "--cache-dir",
            str(data_cache),
            "--subset",
            "640",
            "--test-subset",
            "320",
            "--epochs",
            "3",
            "--grow-at-epoch",
            "1",
            "--widths",
            "8",
            "16",
            "32",
            "--batch-size",
            "64",
            "--out",
            str(tmp_path / "grown"),
        ]
    )
    out = capsys.readouterr().out
    assert result["before"] == result["after"], out
    assert "(equal)" in out and "the grown net ends" in out
    assert "640 training and 320 test images of 10 classes" in out
    if real_cifar10 is None:
        assert "no --data: training on a generated CIFAR-10 stand-in" in out
        assert len(list((data_cache / "synthetic").glob("cifar10-64x32-seed0/*/*/*.jpg"))) == 640 + 320
    grown = surgery.load(tmp_path / "grown", trust_code=True)
    assert grown.get_submodule("features.2.block.net2deeper0.0").out_channels == 48
