"""Peak resident memory of each pytest process, and the tests that raise it.

Runs pytest with ``SUITE_MEMORY=<folder>`` set (tests/memory_probe.py then writes one JSON
line per test per worker), and prints, for each worker (``gw0``, ``gw1``, ... or ``main``),
its peak resident set (``ru_maxrss``) and final resident set, then the tests that raised a
worker's peak most and those that left most memory held (resident set after minus before).

    python bench/suite_memory.py                        # as `make test`: -n 2 --dist loadgroup
    python bench/suite_memory.py -- tests/test_cut.py   # these pytest arguments instead
    python bench/suite_memory.py --report FOLDER        # only summarise an earlier run's folder

Last line: {"workers": {"gw0": {"peak_gb", "final_gb", "tests"}, ...}, "max_peak_gb"}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1024**3
ROOT = Path(__file__).resolve().parents[1]
SUITE = ["-n", "2", "--dist", "loadgroup", "-q"]


def read(folder: Path) -> dict[str, list[dict]]:
    """The probe's lines, by worker name."""
    runs = {f.stem: [json.loads(line) for line in f.read_text().splitlines() if line] for f in folder.glob("*.jsonl")}
    return {name: runs[name] for name in sorted(runs) if runs[name]}  # xdist's controller runs no tests


def peak_raisers(lines: list[dict]) -> list[tuple[int, dict]]:
    """(how much this test raised the worker's peak, line) for each test that raised it."""
    out, high = [], 0
    for line in lines:
        if line["peak"] > high:
            out.append((line["peak"] - high, line))
            high = line["peak"]
    return out


def report(folder: Path, top: int) -> dict:
    """Print the summary of the run recorded in ``folder``; return the last line's figures."""
    runs = read(folder)
    if not runs:
        sys.exit(f"no probe lines in {folder}: was the run started with SUITE_MEMORY set?")
    workers: dict[str, dict[str, float]] = {}
    for name, lines in runs.items():
        peak, final = max(x["peak"] for x in lines) / GB, lines[-1]["rss_after"] / GB
        workers[name] = {"peak_gb": round(peak, 2), "final_gb": round(final, 2), "tests": len(lines)}
        freeing = lines[-1].get("released_s", 0.0)
        print(f"{name}: {len(lines)} tests, peak {peak:.2f} GB, resident at the end {final:.2f} GB, ", end="")
        print(f"{freeing:.0f} s spent freeing memory")
    raised = sorted(((d, w, x) for w, lines in runs.items() for d, x in peak_raisers(lines)[1:]), key=lambda t: -t[0])
    print("\ntests that raised a worker's peak most (MB raised, worker, peak after, seconds):")
    for d, w, x in raised[:top]:
        print(f"  +{d / 2**20:7.0f}  {w}  {x['peak'] / GB:5.2f} GB  {x['seconds']:6.1f} s  {x['test']}")
    held = sorted(
        ((x["rss_after"] - x["rss_before"], w, x) for w, lines in runs.items() for x in lines), key=lambda t: -t[0]
    )
    print("\ntests that left most memory held (MB, worker, resident after):")
    for d, w, x in held[:top]:
        print(f"  +{d / 2**20:7.0f}  {w}  {x['rss_after'] / GB:5.2f} GB  {x['test']}")
    return {"workers": workers, "max_peak_gb": max(w["peak_gb"] for w in workers.values())}


def main() -> None:
    """Run the suite under the probe (or read an earlier folder) and print the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=Path, help="summarise this folder of an earlier run; run nothing")
    p.add_argument("--out", type=Path, help="folder for the probe's lines (default: a new temporary one)")
    p.add_argument("--top", type=int, default=15, help="how many tests to list (default 15)")
    p.add_argument("pytest_args", nargs="*", help=f"pytest arguments (after --; default: {' '.join(SUITE)})")
    args = p.parse_args()
    folder = args.report
    if folder is None:
        folder = args.out or Path(tempfile.mkdtemp(prefix="suite-memory-"))
        if any(folder.glob("*.jsonl")):
            sys.exit(f"{folder} already holds probe lines; give an empty --out folder")
        env = {**os.environ, "SUITE_MEMORY": str(folder)}
        code = subprocess.call([sys.executable, "-m", "pytest", *(args.pytest_args or SUITE)], cwd=ROOT, env=env)
        print(f"\npytest exited {code}; probe lines in {folder}\n")
    print(json.dumps(report(folder, args.top)))


if __name__ == "__main__":
    main()
