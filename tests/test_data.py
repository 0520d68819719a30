"""xross.data: decoding, caching, augmentation and batching.

On the generated CIFAR-10 stand-in (tests/conftest.py), or the real archive with ``CIFAR10_ARCHIVE``,
and on tiny local folders.
"""

from __future__ import annotations

import doctest
import importlib
import io
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as TF

import xross.data.sources
from xross.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    EVAL_SPLITS,
    Augment,
    BatchLoader,
    ImageTensors,
    load_split,
    loader_throughput,
)
from xross.data.synthetic import pack_archive, write_synthetic
from xross.errors import XrossError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """The normalisation Augment documents, written out."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def save_image(path: Path, pixels: np.ndarray, **options: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)


def tagged_pixels(label: int, index: int, size: tuple[int, int] = (4, 4)) -> np.ndarray:
    """A constant RGB image whose red channel encodes its class and green channel its index."""
    return np.full((*size, 3), (40 * label, 10 * index, 7), dtype=np.uint8)


def make_folder(root: Path, counts: dict[str, int], split: str = "train") -> Path:
    """An ImageFolder tree of tagged PNGs: ``counts[class]`` images per class."""
    for label, cls in enumerate(sorted(counts)):
        for index in range(counts[cls]):
            save_image(root / split / cls / f"{index:02d}.png", tagged_pixels(label, index))
    return root


def make_archive(folder: Path, path: Path, top: str | None = None) -> Path:
    """A tar archive of ``folder``'s splits, compressed by the suffix of ``path``, optionally under ``top/``."""
    mode = {".gz": "w:gz", ".xz": "w:xz", ".tar": "w"}[path.suffix]
    with tarfile.open(path, mode) as tar:
        for split in sorted(p for p in folder.iterdir() if p.is_dir()):
            tar.add(split, arcname=f"{top}/{split.name}" if top else split.name)
    return path


@pytest.fixture(scope="module")
def cifar512(cifar10_archive: Path, data_cache: Path) -> ImageTensors:
    return load_split(cifar10_archive, "train", subset=512, cache_dir=data_cache, progress=False)


# --------------------------------------------------------------------------- the CIFAR-10 archive (generated or real)


def test_archive_subset_is_stratified_uint8_nchw(cifar512: ImageTensors) -> None:
    images, labels = cifar512.images, cifar512.labels
    assert images.dtype == torch.uint8 and images.shape == (512, 3, 32, 32) and images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (512,)
    assert cifar512.classes == CIFAR10_CLASSES
    share, extra = divmod(512, 10)  # every class has more than 52 images: the quotas differ by at most one
    assert sorted(torch.bincount(labels, minlength=10).tolist()) == [share] * (10 - extra) + [share + 1] * extra
    assert torch.equal(labels, labels.sort().values)  # ImageFolder order: class by class
    assert len(torch.unique(images.flatten(1), dim=0)) == 512  # 512 different decoded photos


def test_cache_hit_is_identical_and_does_not_read_the_archive(
    cifar512: ImageTensors, cifar10_archive: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reading(*args: object) -> None:
        raise AssertionError("the archive was read again")

    monkeypatch.setattr(xross.data.sources, "scan_archive", no_reading)
    start = time.perf_counter()
    again = load_split(cifar10_archive, "train", subset=512, cache_dir=data_cache, progress=False)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(again.images, cifar512.images) and torch.equal(again.labels, cifar512.labels)
    assert again.classes == cifar512.classes


def test_truncated_archive_is_reported(cifar10_archive: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar.xz"
    with open(cifar10_archive, "rb") as f:
        cut.write_bytes(f.read(min(cifar10_archive.stat().st_size // 2, 1_000_000)))
    with pytest.raises(XrossError, match="corrupt or truncated"):
        load_split(cut, "train", cache_dir=tmp_path / "cache", progress=False)


def test_generated_dataset_reads_alike_from_folder_and_archives(
    synthetic_folder: Path, synthetic_archive: Path, tmp_path: Path
) -> None:
    """The stand-in has the real archive's layout and formats; every form of it decodes to the same tensors."""
    with tarfile.open(synthetic_archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        first = tar.extractfile(members[0]).read()
    assert {m.name.split("/")[0] for m in members} == {"train", "test"}
    assert all(len(m.name.split("/")) == 3 and m.name.endswith(".jpg") for m in members)
    assert first[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(first)).size == (32, 32)
    gz = pack_archive(synthetic_folder, tmp_path / "same.tar.gz")
    cache = tmp_path / "cache"
    for split in ("train", "test"):
        per_class = [len(list((synthetic_folder / split / c).glob("*.jpg"))) for c in CIFAR10_CLASSES]
        sources = (synthetic_folder, synthetic_archive, gz)
        forms = [load_split(source, split, cache_dir=cache, progress=False) for source in sources]
        assert forms[0].classes == CIFAR10_CLASSES and torch.bincount(forms[0].labels).tolist() == per_class
        assert forms[0].images.shape == (sum(per_class), 3, 32, 32)
        for other in forms[1:]:
            assert torch.equal(other.images, forms[0].images) and torch.equal(other.labels, forms[0].labels)


def test_generated_dataset_is_deterministic_and_learnable(synthetic_folder: Path, tmp_path: Path) -> None:
    per_class = len(list((synthetic_folder / "train" / "cat").glob("*.jpg")))
    same = write_synthetic(tmp_path / "same", train_per_class=per_class, test_per_class=1, seed=0)
    other = write_synthetic(tmp_path / "other", train_per_class=per_class, test_per_class=1, seed=1)
    image = Path("train", "cat", "0003.jpg")
    assert (same / image).read_bytes() == (synthetic_folder / image).read_bytes() != (other / image).read_bytes()
    cache = tmp_path / "cache"
    train, test = (load_split(synthetic_folder, split, cache_dir=cache, progress=False) for split in ("train", "test"))

    def colour(data: ImageTensors) -> torch.Tensor:
        return data.images.float().mean((2, 3))  # the mean colour of each image

    centroids = torch.stack([colour(train)[train.labels == c].mean(0) for c in range(len(train.classes))])
    predicted = torch.cdist(colour(test), centroids).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.8  # the class shows in the pixels
    assert len(torch.unique(train.images.flatten(1), dim=0)) == len(train)  # and no two images are alike


# --------------------------------------------------------------------------- sources and errors


@pytest.mark.parametrize("where", ["in a header", "between members", "in a member"])
def test_cut_plain_tar_is_reported(tmp_path: Path, where: str) -> None:
    """Python's tarfile alone stops quietly at a cut header and returns part of the split."""
    whole = make_archive(make_folder(tmp_path / "data", {"a": 30, "b": 30}), tmp_path / "whole.tar")
    with tarfile.open(whole) as tar:
        middle = tar.getmembers()[30]
    header, data = middle.offset, middle.offset_data
    cut_at = {"in a header": header + 100, "between members": header, "in a member": data + 10}[where]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:cut_at])
    with pytest.raises(XrossError, match=f"archive {cut} is corrupt or truncated"):
        load_split(cut, "train", cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.xz"])
@pytest.mark.parametrize("damage", ["cut", "flipped byte"])
def test_damaged_compressed_archive_is_reported(tmp_path: Path, suffix: str, damage: str) -> None:
    whole = make_archive(make_folder(tmp_path / "data", {"a": 30, "b": 30}), tmp_path / f"whole{suffix}")
    data = bytearray(whole.read_bytes())
    if damage == "cut":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / f"damaged{suffix}"
    damaged.write_bytes(data)
    with pytest.raises(XrossError, match=f"archive {damaged} is corrupt or truncated"):
        load_split(damaged, "train", cache_dir=tmp_path / "cache", progress=False)


def test_missing_path_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(XrossError, match="does not exist"):
        load_split(tmp_path / "nowhere.tar.xz", cache_dir=tmp_path, progress=False)
    with pytest.raises(XrossError, match=r"unknown dataset 'cifar-10'.*cifar10, cifar100.*closest: cifar10"):
        load_split("cifar-10", cache_dir=tmp_path, progress=False)


def test_image_folder_decodes_every_format_to_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb, gray = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8), rng.integers(0, 256, (5, 6), dtype=np.uint8)
    rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (5, 6), dtype=np.uint16)
    root = tmp_path / "data"
    save_image(root / "train" / "ant" / "0.png", rgb)
    save_image(root / "train" / "ant" / "1.jpg", np.full((5, 6, 3), 200, np.uint8), quality=95)
    save_image(root / "train" / "bee" / "0.png", gray)
    save_image(root / "train" / "bee" / "1.bmp", rgb)
    save_image(root / "train" / "cow" / "0.png", rgba)
    save_image(root / "train" / "cow" / "1.png", deep)
    (root / "train" / "cow" / "notes.txt").write_text("not an image")

    data = load_split(root, "train", cache_dir=tmp_path / "cache", progress=False)

    assert data.classes == ["ant", "bee", "cow"] and data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    assert torch.equal(data.images[0], chw)
    assert (data.images[1].int() - 200).abs().max() <= 2  # JPEG: near, not exact
    assert torch.equal(data.images[2], torch.from_numpy(gray).expand(3, 5, 6))
    assert torch.equal(data.images[3], chw)  # BMP, through PIL
    assert torch.equal(data.images[4], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))
    assert torch.equal(data.images[5], torch.from_numpy((deep >> 8).astype(np.uint8)).expand(3, 5, 6))


def test_archive_under_a_top_folder_matches_the_folder(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "data", {"a": 3, "b": 2})
    make_folder(folder, {"a": 1}, split="test")
    archive = make_archive(folder, tmp_path / "data.tar.gz", top="cifar-mini")
    from_folder = load_split(folder, "train", cache_dir=tmp_path / "cache", progress=False)
    from_archive = load_split(archive, "train", cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(from_archive.images, from_folder.images) and torch.equal(from_archive.labels, from_folder.labels)
    assert from_archive.classes == ["a", "b"]
    with pytest.raises(XrossError, match=r"no 'val/' folder \(it has 'test', 'train'\)"):
        load_split(archive, "val", cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(XrossError, match=r"no 'val/' folder \(it has 'test', 'train'\)"):
        load_split(folder, "val", cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("suffix", ["", ".tar", ".tar.gz", ".tar.xz"])
def test_evaluation_split_is_test_else_val(tmp_path: Path, suffix: str) -> None:
    """ImageNet's layout (train/ and val/) evaluates val/; with test/ as well, test/ (folders and archives alike)."""
    imagenet = make_folder(make_folder(tmp_path / "imagenet", {"a": 2, "b": 1}), {"a": 1, "b": 2}, split="val")
    both = make_folder(make_folder(tmp_path / "both", {"a": 1}, split="val"), {"a": 3}, split="test")
    neither = make_folder(tmp_path / "neither", {"a": 1})
    if suffix:
        imagenet, both, neither = (make_archive(f, tmp_path / f"{f.name}{suffix}") for f in (imagenet, both, neither))
    kw = {"cache_dir": tmp_path / "cache", "progress": False}
    for _ in range(2):  # decoded, then from the cache
        val = load_split(imagenet, EVAL_SPLITS, **kw)
        assert val.split == "val" and val.labels.tolist() == [0, 1, 1]
        assert torch.equal(val.images, load_split(imagenet, "val", **kw).images)
        test = load_split(both, EVAL_SPLITS, **kw)
        assert test.split == "test" and len(test) == 3
    with pytest.raises(XrossError, match=r"has no 'test/' or 'val/' folder \(it has 'train'\); pass one"):
        load_split(neither, EVAL_SPLITS, **kw)


def test_images_pair_with_their_labels_and_subset_is_balanced(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "data", {"a": 5, "b": 5, "c": 2})
    cache = tmp_path / "cache"
    picks = [load_split(folder, subset=9, seed=seed, cache_dir=cache, progress=False) for seed in (0, 0, 1, 2, 3)]
    for data in picks:
        assert torch.equal(data.images[:, 0, 0, 0] // 40, data.labels)  # red channel encodes the class
        assert sorted(torch.bincount(data.labels).tolist()) == [2, 3, 4]  # c is full, a and b split the rest
    assert torch.equal(picks[0].images, picks[1].images)
    assert any(not torch.equal(picks[0].images, other.images) for other in picks[2:])
    with pytest.raises(XrossError, match="subset=13 but .* has only 12 images"):
        load_split(folder, subset=13, cache_dir=tmp_path / "cache", progress=False)


def test_mixed_sizes_need_image_size_then_are_resized(tmp_path: Path) -> None:
    root = tmp_path / "data"
    small, tall = tagged_pixels(0, 0, (8, 8)), np.random.default_rng(0).integers(0, 256, (12, 6, 3), dtype=np.uint8)
    save_image(root / "train" / "a" / "small.png", small)
    save_image(root / "train" / "b" / "tall.png", tall)
    with pytest.raises(XrossError, match=r"2 different sizes \(e.g. 8x8, 12x6\); pass image_size=N"):
        load_split(root, cache_dir=tmp_path / "cache", progress=False)
    data = load_split(root, image_size=8, cache_dir=tmp_path / "cache", progress=False)
    assert data.images.shape == (2, 3, 8, 8)
    assert torch.equal(data.images[0], torch.from_numpy(small).permute(2, 0, 1))
    expected = TF.resize(torch.from_numpy(tall).permute(2, 0, 1)[None], [8, 8], antialias=True)[0]
    assert torch.equal(data.images[1], expected)


def damaged_png() -> bytes:
    """A PNG with one byte of its pixel data changed (this one crashes torchvision 0.29's PNG decoder)."""
    with io.BytesIO() as f:
        Image.fromarray(tagged_pixels(1, 0)).save(f, format="PNG")
        data = bytearray(f.getvalue())
    data[50] ^= 233
    return bytes(data)


@pytest.mark.parametrize(
    "name, content",
    [("bad.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("bad.png", damaged_png()), ("empty.png", b"")],
)
def test_undecodable_image_is_named(tmp_path: Path, name: str, content: bytes) -> None:
    root = make_folder(tmp_path / "data", {"a": 2})
    (root / "train" / "a" / name).write_bytes(content)
    with pytest.raises(XrossError, match=f"cannot decode image 'train/a/{name}'"):
        load_split(root, cache_dir=tmp_path / "cache", progress=False)


def test_split_without_images_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "test" / "a").mkdir(parents=True)
    (root / "test" / "a" / "readme.txt").write_text("no images here")
    with pytest.raises(XrossError, match="no images"):
        load_split(root, "test", cache_dir=tmp_path / "cache", progress=False)


def test_cifar_names_use_torchvision_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The download itself cannot run here; a stand-in for torchvision's class checks the conversion."""
    arrays = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    calls = []

    class StandIn:
        classes = ["x", "y"]

        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((Path(root), train, download))
            self.data, self.targets = arrays, [i % 2 for i in range(20)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", StandIn)
    data = load_split("cifar10", "test", subset=10, cache_dir=tmp_path, progress=False)
    assert calls == [(tmp_path / "cifar10", False, True)]
    assert data.images.is_contiguous() and data.classes == ["x", "y"]
    assert torch.bincount(data.labels).tolist() == [5, 5]
    chw = [torch.from_numpy(array).permute(2, 0, 1) for array in arrays]
    kept = [next(i for i in range(20) if torch.equal(chw[i], image)) for image in data.images]
    assert [i % 2 for i in kept] == data.labels.tolist()
    with pytest.raises(XrossError, match="'train' and 'test', not 'val'"):
        load_split("cifar10", "val", cache_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------- cache


def corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a safetensors file")


def corrupt_shape(path: Path) -> None:
    save_file({"images": torch.zeros(3, 3, 4, 4, dtype=torch.uint8), "labels": torch.zeros(2, dtype=torch.int64)}, path)


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_garbage, corrupt_shape])
def test_corrupt_cache_file_is_rebuilt(tmp_path: Path, corrupt) -> None:
    folder, cache = make_folder(tmp_path / "data", {"a": 3, "b": 3}), tmp_path / "cache"
    first = load_split(folder, subset=4, cache_dir=cache, progress=False)
    (tensors,) = cache.glob("*.safetensors")
    corrupt(tensors)
    with pytest.warns(UserWarning, match="unreadable .* rebuilding"):
        rebuilt = load_split(folder, subset=4, cache_dir=cache, progress=False)
    assert torch.equal(rebuilt.images, first.images) and torch.equal(rebuilt.labels, first.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_split(folder, subset=4, cache_dir=cache, progress=False)  # the rebuilt file is good
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".safetensors"]  # no temporary files left


def test_changed_source_misses_the_cache(tmp_path: Path) -> None:
    folder, cache = make_folder(tmp_path / "data", {"a": 2}), tmp_path / "cache"
    assert len(load_split(folder, cache_dir=cache, progress=False)) == 2
    save_image(folder / "train" / "a" / "extra.png", tagged_pixels(0, 9))
    assert len(load_split(folder, cache_dir=cache, progress=False)) == 3


# --------------------------------------------------------------------------- Augment


def test_augment_eval_only_normalises() -> None:
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = Augment()(images, train=False)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, normalise(images))
    with pytest.raises(XrossError, match="uint8"):
        Augment()(images.float())


def test_augment_output_is_a_flipped_or_plain_crop_of_the_padded_image() -> None:
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    out = Augment(crop_padding=4)(images, torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))

    def crop(i: int, top: int, left: int, flip: bool) -> torch.Tensor:
        window = padded[i : i + 1, :, top : top + 32, left : left + 32]
        return normalise(window.flip(-1) if flip else window)

    found = []
    for i in range(len(images)):
        offsets = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)]
        matches = [params for params in offsets if torch.equal(crop(i, *params), out[i : i + 1])]
        assert len(matches) == 1, f"sample {i} is not one crop of its padded image"
        found += matches
    assert {flip for _, _, flip in found} == {False, True}
    assert len({(top, left) for top, left, _ in found}) > 5


def test_augment_is_reproducible_from_its_generator() -> None:
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    augment = Augment()
    a, b, c = (augment(images, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- BatchLoader


def as_lists(batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    batches = list(batches)
    return [x for x, _ in batches], [y for _, y in batches]


def test_loader_is_deterministic_per_seed_and_epoch(cifar512: ImageTensors) -> None:
    loader = BatchLoader(cifar512, 64, seed=3)
    assert len(loader) == 8
    x0, y0 = as_lists(loader.epoch(0))
    x0_again, y0_again = as_lists(BatchLoader(cifar512, 64, seed=3).epoch(0))
    x1, y1 = as_lists(loader.epoch(1))
    assert all(torch.equal(a, b) for a, b in zip(x0 + y0, x0_again + y0_again))
    assert all(x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 for x in x0)
    assert not torch.equal(torch.cat(y0), torch.cat(y1))
    assert torch.equal(torch.cat(y0).sort().values, cifar512.labels)  # an epoch is a permutation
    other_seed = as_lists(BatchLoader(cifar512, 64, seed=4).epoch(0))[1]
    assert not torch.equal(torch.cat(y0), torch.cat(other_seed))


def test_start_step_resumes_exactly(cifar512: ImageTensors) -> None:
    loader = BatchLoader(cifar512, 64, seed=1)
    full, resumed = list(loader.epoch(2)), list(loader.epoch(2, start_step=3))
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], resumed))


@pytest.mark.parametrize("train, batch_size", [(True, 64), (False, 100)])
def test_two_ranks_together_equal_one_process(cifar512: ImageTensors, train: bool, batch_size: int) -> None:
    single = list(BatchLoader(cifar512, batch_size, train=train, seed=7).epoch(4))
    ranks = [
        list(BatchLoader(cifar512, batch_size, train=train, seed=7, rank=r, world_size=2).epoch(4)) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert abs(len(y0) - len(y1)) <= 1


def test_eval_loader_sees_every_sample_once_in_order(cifar512: ImageTensors) -> None:
    x, y = as_lists(BatchLoader(cifar512, 100, train=False).epoch(0))
    assert [len(b) for b in y] == [100] * 5 + [12]
    assert torch.equal(torch.cat(y), cifar512.labels) and torch.equal(torch.cat(x), normalise(cifar512.images))


def test_loader_rejects_bad_sharding(cifar512: ImageTensors) -> None:
    with pytest.raises(XrossError, match="not a positive multiple of world_size=2"):
        BatchLoader(cifar512, 63, world_size=2)
    with pytest.raises(XrossError, match="rank=2 is outside"):
        BatchLoader(cifar512, 64, rank=2, world_size=2)


def test_loader_throughput_is_positive(cifar512: ImageTensors) -> None:
    assert loader_throughput(cifar512, batch_size=64, steps=5) > 0


DATA_MODULES = ["", ".sources", ".subset", ".decode", ".cache", ".augment", ".loader", ".progress", ".synthetic"]


@pytest.mark.parametrize("module", DATA_MODULES)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(f"xross.data{module}"))
    assert result.attempted > 0 and result.failed == 0
