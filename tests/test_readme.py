"""Every example in README.md runs as written: each ```python block and each line of each ```bash/```console block.

How they run (one test per block, named by its first line in README.md, in its own empty directory):

* A python block runs in a fresh namespace of this process (no state from other blocks),
  compiled with README.md's line numbers, so a failure points at the README's line.
* A shell block runs its lines in order (a ```console block: its ``$ `` lines). A line of
  the three commands (``surgery``, ``growth``, ``xross``; chains joined by ``&&`` or ``;``
  are split) runs in this process through their entry point, as ``cli`` does; ``python
  FILE ...`` runs FILE in this process too; any other line runs in bash with ``.venv/bin``
  first on PATH. ``examples/`` is linked into the directory: the README runs from the
  repository's root.
* Under a ``$`` line, the output the README shows must be what the line prints
  (whitespace aside), unless :data:`SMALLER` changed the line. ``README_UPDATE=1`` writes
  what they print into README.md instead (regenerated, never typed by hand).
* :data:`SMALLER` shrinks what the README's sizes would make slow (epochs, images,
  steps); each substitution must still match the README, so the table cannot go stale.
* :data:`STAND_INS`: ``make demo`` runs the Makefile's demo recipe (so the README and the
  Makefile agree), activating ``.venv`` is a no-op here, ``make test`` is this suite.
* A line marked ``# not run by the tests: <why>`` is skipped; :data:`NOT_RUN` lists them
  all, and a test checks that exactly those are marked.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
SKIP_MARK = "# not run by the tests:"

SMALLER: tuple[tuple[str, str], ...] = (
    (r"--epochs \d+", "--epochs 1"),
    (r"\bepochs=\d+", "epochs=1"),
    (r"train_per_class=100, test_per_class=20", "train_per_class=8, test_per_class=2"),
    (r"examples/make_tiny\.py images", "examples/make_tiny.py images --train 8 --test 2"),
    (r"--steps 20\b", "--steps 3"),
    (r"\bsteps=20\b", "steps=3"),
    (r"--wall-clock 100\b", "--wall-clock 5"),
    (r"xross profile (\S+)", r"xross profile \1 --repeats 2 --batch 4"),
    (r"--images 200\b", "--images 20"),
)
"""(pattern, replacement) applied to every example: 1 epoch; 8 training images per class (a full batch of 64
after a tenth is held out) and 2 test images; 3 growth steps; 5 images timed one by one; latencies from 2
repeats at batch 4; diagnostics on the 20 test images."""

NOT_RUN = (
    "torchrun --nproc_per_node=2 -m xross train --nets",
    "torchrun --nproc_per_node=2 examples/pipeline_gpt2.py",
    "torchrun --nproc_per_node=2 -m xross train --parallel fsdp",
    "--data cifar10 --epochs 30 --out runs/c10",
)
"""Fragments of the lines the README marks as not run (multi-process, download)."""

STAND_INS = {"make test": None, ". .venv/bin/activate": ""}
"""Lines replaced here: None skips (``make test`` is this very suite), a string is run instead."""

OUR_TOOLS = ("surgery", "growth", "xross")


@dataclass
class Block:
    """One fenced block of README.md: its language, first code line (1-based) and lines."""

    lang: str
    line: int
    lines: list[str]

    @property
    def id(self) -> str:
        return f"{self.lang}:{self.line}"


def blocks(text: str) -> list[Block]:
    """The ```python, ```bash and ```console blocks of ``text``."""
    found, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if current is None:
            match = re.fullmatch(r"```(python|bash|console)\s*", line)
            if match:
                current = Block(match.group(1), number + 1, [])
        elif line.startswith("```"):
            found.append(current)
            current = None
        else:
            current.lines.append(line)
    return found


def smaller(text: str) -> str:
    """``text`` with every :data:`SMALLER` substitution applied."""
    for pattern, replacement in SMALLER:
        text = re.sub(pattern, replacement, text)
    return text


def demo_recipe() -> str:
    """The Makefile's ``demo`` command, as one runs it with ``.venv/bin`` on PATH."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    return lines[start + 1].strip().replace("$(BIN)/", "")


@dataclass
class Command:
    """One shell line to run, and the output the README shows under it (console blocks)."""

    text: str
    shown: list[str] | None
    line: int


def commands(block: Block) -> list[Command]:
    """The shell lines of a block, with the output shown under each ``$`` line of a console block."""
    if block.lang == "bash":
        return [
            Command(line, None, block.line + i)
            for i, line in enumerate(block.lines)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    found: list[Command] = []
    for i, line in enumerate(block.lines):
        if line.startswith("$ "):
            found.append(Command(line[2:], [], block.line + i))
        elif found:
            found[-1].shown.append(line)
    return found


ALL = blocks(README.read_text())
SLOW = {b.id for b in ALL if any(re.search(r"xross (train|distill)|xross\.(train|distill)", s) for s in b.lines)}


def _collapsed(text: str) -> str:
    return " ".join(text.split())


class Shell:
    """Runs one block's shell lines in ``cwd``: our commands and python files in-process, the rest in bash."""

    def __init__(self, cwd: Path, cli, capsys: pytest.CaptureFixture[str]) -> None:
        self.cwd, self.cli, self.capsys = cwd, cli, capsys
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(self, line: str) -> str:
        """Run ``line``; its output (stdout then stderr). Fails the test when it fails."""
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True  # split at blanks and at ; & | < > ( ) only
        tokens = list(lexer)
        if any(t not in (";", "&&") and set(t) <= set(";&|<>()") for t in tokens):
            return self._bash(line)
        out, part = [], []
        for token in [*tokens, ";"]:
            if token in (";", "&&"):
                out.append(self._one(part, line) if part else "")
                part = []
            else:
                part.append(token)
        return "".join(out)

    def _one(self, argv: list[str], line: str) -> str:
        if argv[0] in OUR_TOOLS:
            r = self.cli(argv[0], *argv[1:])
            assert r.code == 0, f"{line!r} failed (exit {r.code}):\n{r.err[-2000:]}\n{r.out[-2000:]}"
            return r.out + r.err
        if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
            return self._python_file(argv[1:])
        return self._bash(shlex.join(argv))

    def _python_file(self, argv: list[str]) -> str:
        self.capsys.readouterr()
        saved = sys.argv
        sys.argv = argv
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            assert not e.code, f"python {shlex.join(argv)} exited with {e.code}: {self.capsys.readouterr()}"
        finally:
            sys.argv = saved
        captured = self.capsys.readouterr()
        return captured.out + captured.err

    def _bash(self, line: str) -> str:
        r = subprocess.run(["bash", "-c", line], cwd=self.cwd, env=self.env, capture_output=True, text=True)
        assert r.returncode == 0, f"{line!r} failed (exit {r.returncode}):\n{r.stderr[-2000:]}\n{r.stdout[-2000:]}"
        return r.stdout + r.stderr


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory to run in, as the repository's root would be: examples/ linked, a private data cache."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XROSS_CACHE", str(tmp_path / ".cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from surgery.cli import kit as clikit

    for console in (clikit.console, clikit.err_console):  # a terminal of 120 columns, not a pipe's 80
        monkeypatch.setattr(console, "width", 120)
    return tmp_path


def _params() -> list:
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.id in SLOW else []) for b in ALL]


@pytest.mark.parametrize("block", _params())
def test_readme_example_runs(block: Block, workdir: Path, cli, capsys: pytest.CaptureFixture[str]) -> None:
    if block.lang == "python":
        code = "\n" * (block.line - 1) + smaller("\n".join(block.lines))
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
        return
    shell, updates = Shell(workdir, cli, capsys), []
    for command in commands(block):
        if SKIP_MARK in command.text:
            continue
        bare = command.text.split("  #")[0].strip()
        text = demo_recipe() if bare == "make demo" else STAND_INS.get(bare, smaller(command.text))
        if text is None:
            continue
        printed = shell.run(text) if text else ""
        if command.shown is None or smaller(command.text) != command.text:
            continue
        if os.environ.get("README_UPDATE"):
            updates.append((command, printed))
            continue
        assert _collapsed(printed) == _collapsed("\n".join(command.shown)), (
            f"README.md:{command.line}: {command.text!r} prints\n{printed}\nnot what the README shows "
            "(README_UPDATE=1 pytest tests/test_readme.py -k this rewrites it)"
        )
    _update(updates)


def _update(updates: list[tuple[Command, str]]) -> None:
    """Write what each ``$`` line printed under it in README.md (``README_UPDATE=1``)."""
    if not updates:
        return
    lines = README.read_text().splitlines()
    for command, printed in updates:  # found by its text: an earlier update may have moved it
        start = lines.index(f"$ {command.text}") + 1
        lines[start : start + len(command.shown)] = [line.rstrip() for line in printed.rstrip("\n").splitlines()]
    README.write_text("\n".join(lines) + "\n")


def test_readme_lines_not_run_are_exactly_the_marked_ones() -> None:
    """Skipping is explicit: the lines marked as not run are those NOT_RUN names, each with its reason."""
    marked = [c.text for b in ALL if b.lang != "python" for c in commands(b) if SKIP_MARK in c.text]
    assert len(marked) == len(NOT_RUN), marked
    for fragment in NOT_RUN:
        assert sum(fragment in line for line in marked) == 1, (fragment, marked)
    for line in marked:
        assert line.split(SKIP_MARK, 1)[1].strip(), f"say why it is not run: {line!r}"


def test_readme_substitutions_still_match() -> None:
    """Each SMALLER substitution changes some example (else it is stale), and only sizes: no command disappears."""
    code = "\n".join(line for b in ALL for line in b.lines)
    for pattern, _ in SMALLER:
        assert re.search(pattern, code), f"SMALLER's {pattern!r} matches no README example any more; drop it"
    assert "make demo" in code and demo_recipe().startswith("surgery cut ")


def test_readme_has_its_sections() -> None:
    """A quick start of five lines first, a table of contents whose links resolve, the data and troubleshooting."""
    text = README.read_text()
    headings = re.findall(r"^#{2,3} (.+)$", text, flags=re.M)
    assert headings[:2] == ["Quick start", "Contents"], headings[:3]
    quick = blocks(text)[0]
    assert quick.line < text.index("## Contents") and len(quick.lines) == 5, quick
    anchors = {_anchor(h) for h in headings}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links and not [a for a in links if a not in anchors], [a for a in links if a not in anchors]
    for section in ("Data: what `--data` accepts", "Troubleshooting", "Benchmarks and results"):
        assert section in headings, section
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
