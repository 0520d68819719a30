"""Shared fixtures. Tests run on CPU; under pytest-xdist each worker uses one thread."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# the shared archive beside the project; CIFAR10_ARCHIVE=/path/to/archive.tar.xz points elsewhere
CIFAR10_ARCHIVE = Path(os.environ.get("CIFAR10_ARCHIVE", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    """The shared CIFAR-10 JPEG archive (ImageFolder layout inside a .tar.xz)."""
    assert CIFAR10_ARCHIVE.is_file(), f"shared data missing: {CIFAR10_ARCHIVE} (set CIFAR10_ARCHIVE to the archive's path)"
    return CIFAR10_ARCHIVE


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory for decoded datasets, shared by the tests of one worker."""
    return tmp_path_factory.mktemp("xross-cache")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-400:]!r}, err={self.err[-400:]!r})"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run a command-line tool in-process: ``cli("surgery", "cut", ...) -> CliResult``."""
    import importlib

    from surgery.clikit import run_app

    def run(tool: str, *args: str) -> CliResult:
        app = importlib.import_module(f"{tool}.cli").app
        capsys.readouterr()
        try:
            run_app(app, [str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
