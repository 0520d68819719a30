"""Crossing bytes of cut points and where to split between a device and a server (surgery.split)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torchvision

import surgery
from surgery.pieces.cutpoints import CutPoint
from surgery.pieces.split import ALL_ON_DEVICE, ALL_ON_SERVER, rank_splits


@pytest.fixture(scope="module")
def r18() -> torch.nn.Module:
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.mark.parametrize("name,crossing", [("layer2.0.conv2", 2), ("layer2", 1), ("layer3.1.bn1", 2)])
def test_crossing_bytes_are_the_bytes_of_the_values_handed_over(r18: torch.nn.Module, name: str, crossing: int) -> None:
    x = torch.randn(4, 3, 64, 64)
    point = next(p for p in surgery.cut_points(r18, x) if p.name == name)
    with torch.no_grad():
        out = surgery.cut(r18, name)[0](x[:1])  # at batch size 1
    values = out if isinstance(out, tuple) else (out,)
    assert point.crossing == len(values) == crossing
    assert point.bytes == sum(v.numel() * v.element_size() for v in values)
    assert surgery.cut_points(r18, include_nodes=False)[0].bytes is None  # no example input: unknown


def _brute_force(points: list[CutPoint], device: float, server: float, link: float, total: float, sent: float):
    options = [(ALL_ON_SERVER, 0.0, sent), *((p.name, float(p.flops), float(p.bytes)) for p in points)]
    options.append((ALL_ON_DEVICE, total, 0.0))
    timed = [(name, work / device + data / link + (total - work) / server) for name, work, data in options]
    return sorted(timed, key=lambda t: t[1])


def test_ranking_equals_brute_force() -> None:
    rng = random.Random(0)
    for trial in range(20):
        flops = sorted(rng.uniform(0, 1e10) for _ in range(12))
        points = [
            CutPoint(f"p{i}", "node", f"p{i}", i, 0, 1, flops=int(f), bytes=rng.randrange(1, 10**7))
            for i, f in enumerate(flops)
        ]
        total, sent = 1.2e10, rng.randrange(1, 10**6)
        rates = (rng.choice([1e9, 1e10, 1e11]), rng.choice([1e11, 1e12, 1e13]), rng.choice([1e5, 1e6, 1e7, 1e8]))
        ranked = rank_splits(points, *rates, total_flops=total, input_bytes=sent)
        want = _brute_force(points, *rates, total, sent)
        assert [c.name for c in ranked] == [n for n, _ in want], trial
        assert all(abs(c.total_s - t) <= 1e-12 * max(1.0, t) for c, (_, t) in zip(ranked, want))
        assert all(c.total_s == pytest.approx(sum(c.times[:3])) for c in ranked)
    # one choice per graph position; without input bytes there is no "all on the server"
    twins = [CutPoint(name, "module", "n", 5, 1, 1, flops=10, bytes=4) for name in ("layer2", "layer2.1")]
    assert [c.name for c in rank_splits(twins, 1, 1e3, 1e9, total_flops=20)] == ["layer2", ALL_ON_DEVICE]


@pytest.mark.parametrize(
    "kwargs", [dict(device_flops=0), dict(server_flops=-1e12), dict(bandwidth=float("nan")), dict(total_flops=1)]
)
def test_bad_numbers_are_one_line(kwargs: dict) -> None:
    points = [CutPoint("a", "node", "a", 0, 0, 1, flops=100, bytes=10)]
    args = dict(device_flops=1e9, server_flops=1e12, bandwidth=1e6) | kwargs
    with pytest.raises(surgery.SurgeryError) as e:
        rank_splits(points, **args)
    assert "\n" not in str(e.value)
    with pytest.raises(surgery.SurgeryError, match="example input"):
        rank_splits([CutPoint("a", "node", "a", 0, 0, 1)], 1e9, 1e12, 1e6)


def test_cli_suggest_split_ranks_and_saves_nothing(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["cut", "resnet18", "--num-classes", "10", "--input", "1,3,64,64", "--suggest-split"]
    r = cli("surgery", *base, "--device-flops", "10G", "--server-flops", "1T", "--bandwidth", "12.5M")
    assert r.code == 0, r
    assert "total ms" in r.out and "transfer" in r.out and "(all on server)" in r.out
    assert list(tmp_path.iterdir()) == []  # nothing cut or saved
    # a slow link keeps everything on the device
    r = cli("surgery", *base, "--device-flops", "1T", "--server-flops", "1T", "--bandwidth", "1k")
    assert r.code == 0 and ALL_ON_DEVICE in r.out, r
    for (device, server, link), message in [
        (("fast", "1T", "1M"), "--device-flops 'fast' is not a number"),
        (("10G", "-1T", "1M"), "--server-flops must be a positive number"),
        (("10G", "1T", "0"), "--bandwidth must be a positive number"),
    ]:
        r = cli("surgery", *base, "--device-flops", device, "--server-flops", server, "--bandwidth", link)
        assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r
    not_enough = [([], "needs --device-flops, --server-flops and --bandwidth"), (["--no-suggest-split"], "--at point")]
    for missing, message in not_enough:
        r = cli("surgery", *base, "--device-flops", "10G", *missing)
        assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r


def test_cli_nodes_shows_crossing_bytes(cli) -> None:
    r = cli("surgery", "nodes", "resnet18", "--num-classes", "10", "--input", "1,3,32,32", "--depth", "1")
    assert r.code == 0, r
    assert "bytes" in r.out and "8.19kB" in r.out  # layer2: 128x4x4 float32
