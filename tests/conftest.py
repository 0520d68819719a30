"""Shared fixtures. Tests run on CPU; under pytest-xdist each worker uses one thread.

The data tests run on a small generated CIFAR-10 stand-in (:mod:`xross.data.synthetic`),
made once per test session (per xdist worker): 10 classes named like CIFAR-10's, 60
training and 20 test 32x32 JPEGs per class, as an ImageFolder directory and as a
``.tar.xz`` archive laid out like the CIFAR-10 JPEG archive. ``CIFAR10_ARCHIVE=/path/to/
cifar10-jpeg.tar.xz`` runs them on the real archive instead (``cifar10_archive`` is then
that file).

Shared by several test modules: ``r18`` (a 10-class ResNet-18 for the surgery tests),
``resnet18`` (a ResNet-18 with varied constant weights for the growth tests; test_remap.py
keeps its own) and ``cohort`` (two small VGGs cut after ``features.0``). Shared helpers
that are not fixtures are in tests/helpers.py.

Memory (tests/memory_probe.py): after each test, reference cycles are collected and freed heap is
handed back once 256 MB is held, and a module's own ``functools`` caches are emptied after its last
test. ``SUITE_MEMORY=<folder>`` records each test's resident memory there (``bench/suite_memory.py``).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest
import torch
from helpers import tiny
from memory_probe import clear_caches, freeze, register, release

import surgery
from growth.check import vary_constant_weights
from xross.cohort.grid import Cohort

ROOT = Path(__file__).resolve().parents[1]
REAL_ARCHIVE = Path(os.environ["CIFAR10_ARCHIVE"]).expanduser() if os.environ.get("CIFAR10_ARCHIVE") else None
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 60, 20  # images per class of the generated dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """With ``SUITE_MEMORY=<folder>``, record each test's resident memory there (bench/suite_memory.py)."""
    register(config)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what is alive once the tests are collected, so that the collection after each test is cheap."""
    freeze()


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """After each test (its fixtures torn down), free its cycles and return the freed heap (memory_probe.release).

    After a module's last test, its own ``functools`` caches are emptied too: they held its models for the rest
    of the worker's session.
    """
    yield
    module = getattr(item, "module", None)
    if module is not None and getattr(nextitem, "module", None) is not module:
        clear_caches(module)
    release()


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated CIFAR-10 stand-in as an ImageFolder directory ``<root>/<split>/<class>/<nnnn>.jpg``."""
    from xross.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "cifar10-synthetic"
    return write_synthetic(root, train_per_class=SYNTHETIC_TRAIN, test_per_class=SYNTHETIC_TEST, seed=0)


@pytest.fixture(scope="session")
def synthetic_archive(synthetic_folder: Path) -> Path:
    """The generated dataset as a ``.tar.xz`` with members ``<split>/<class>/<image>`` (the CIFAR archive's layout)."""
    from xross.data.synthetic import pack_archive

    return pack_archive(synthetic_folder, synthetic_folder.parent / "cifar10-synthetic.tar.xz")


@pytest.fixture(scope="session")
def real_cifar10() -> Path | None:
    """The real CIFAR-10 JPEG archive named by ``CIFAR10_ARCHIVE``, or None when that is not set."""
    if REAL_ARCHIVE is not None:
        assert REAL_ARCHIVE.is_file(), f"CIFAR10_ARCHIVE={REAL_ARCHIVE} is not a file"
    return REAL_ARCHIVE


@pytest.fixture(scope="session")
def cifar10_archive(real_cifar10: Path | None, synthetic_archive: Path) -> Path:
    """The dataset of the data tests: ``$CIFAR10_ARCHIVE`` when set, else the generated ``.tar.xz``."""
    return real_cifar10 if real_cifar10 is not None else synthetic_archive


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory for decoded datasets, shared by the tests of one worker."""
    return tmp_path_factory.mktemp("xross-cache")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def r18() -> torch.nn.Module:
    """A ResNet-18 for 10 classes, in eval mode (test_split.py has its own, built by torchvision)."""
    return surgery.build_model("resnet18", num_classes=10).eval()


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    """A ResNet-18 in eval mode whose constant weights are varied, so that a growth check sees every layer."""
    torch.manual_seed(0)
    return vary_constant_weights(surgery.build_model("resnet18").eval(), torch.Generator().manual_seed(0))


@pytest.fixture
def cohort() -> Cohort:
    """Two small VGGs for 10 classes cut after ``features.0``: 8 vs 12 channels there, so adapters both ways."""
    torch.manual_seed(0)
    return Cohort.build([tiny([8, 16]), tiny([12, 16])], cuts=["features.0"], num_classes=10, image_size=16)


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-400:]!r}, err={self.err[-400:]!r})"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run a command-line tool in-process: ``cli("surgery", "cut", ...) -> CliResult``."""
    from helpers import cli_app

    from surgery.cli.kit import run_app

    def run(tool: str, *args: str) -> CliResult:
        app = cli_app(tool)
        capsys.readouterr()
        try:
            run_app(app, [str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
