"""A small generated stand-in for CIFAR-10: the same layout and formats, made in a second, learnable.

Ten classes named like CIFAR-10's; each image is 32x32 RGB, a class-coloured stripe
pattern (the hue and the stripes' angle and frequency depend on the class; the phase,
contrast, brightness and a little colour shift on the image) plus Gaussian noise, saved
as a JPEG. Everything is deterministic in ``seed``. :func:`write_synthetic` writes it
as an ImageFolder directory ``<root>/<split>/<class>/<nnnn>.jpg``, the layout of the
CIFAR-10 JPEG archive; :func:`pack_archive` packs such a directory into a ``.tar``,
``.tar.gz``/``.tgz`` or ``.tar.xz`` archive with members ``<split>/<class>/<image>``.

>>> import tempfile
>>> from xross.data import load_split
>>> root = write_synthetic(Path(tempfile.mkdtemp()) / "mini", train_per_class=2, test_per_class=1)
>>> data = load_split(root, "test", cache_dir=root.parent / "cache", progress=False)
>>> data.images.shape, data.labels.tolist(), data.classes[:3]
(torch.Size([10, 3, 32, 32]), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], ['airplane', 'automobile', 'bird'])
"""

from __future__ import annotations

import colorsys
import io
import math
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from surgery.core.util import atomic_directory, atomic_write
from xross.errors import XrossError

__all__ = ["CIFAR10_CLASSES", "pack_archive", "synthetic_image", "write_synthetic"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_COMPRESSION = {".tar": "", ".tgz": "gz", ".gz": "gz", ".xz": "xz"}


def synthetic_image(label: int, rng: np.random.Generator, size: int = 32, classes: int = 10) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of class ``label``: coloured stripes whose look depends on the class."""
    hue = label / classes
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.9)) * 255 + rng.normal(0, 12, 3)
    angle = math.pi * ((label * 3) % classes) / classes
    frequency = 1.5 + (label % 4)  # stripes per image width
    y, x = np.mgrid[0:size, 0:size] / size
    wave = np.sin(2 * math.pi * frequency * (x * math.cos(angle) + y * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    contrast, brightness = rng.uniform(0.3, 0.5), rng.uniform(0.75, 1.1)
    pixels = colour * brightness * (1 - contrast + contrast * wave)[..., None] + rng.normal(0, 18, (size, size, 3))
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def write_synthetic(
    root: str | os.PathLike,
    *,
    train_per_class: int = 60,
    test_per_class: int = 20,
    classes: Sequence[str] = CIFAR10_CLASSES,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write the dataset as an ImageFolder directory at ``root`` (atomically) and return ``root``.

    An existing ``root`` directory is taken as already written and returned as it is.
    """
    root = Path(root)
    if root.is_dir():
        return root
    counts = {"train": train_per_class, "test": test_per_class}
    if min(counts.values()) < 0 or not classes or max(counts.values()) == 0:
        raise XrossError(f"a synthetic dataset needs classes and images, not {counts} per class of {len(classes)}")

    def fill(tmp: Path) -> None:
        for split, count in counts.items():
            for label, name in enumerate(classes):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                rng = np.random.default_rng([seed, 0 if split == "train" else 1, label])
                for index in range(count):
                    pixels = synthetic_image(label, rng, classes=len(classes))
                    Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=quality)

    return atomic_directory(root, fill)


def pack_archive(folder: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """Pack ``folder``'s split folders into a tar archive compressed by ``archive``'s suffix; returns its path.

    Members are ``<split>/<class>/<image>`` in sorted order with fixed owners and times,
    so the same folder always gives the same archive bytes.
    """
    folder, archive = Path(folder), Path(archive)
    compression = _COMPRESSION.get(archive.suffix)
    if compression is None or (archive.suffix in (".gz", ".xz") and not archive.name.endswith(".tar" + archive.suffix)):
        raise XrossError(f"'{archive.name}' is not a .tar, .tar.gz, .tgz or .tar.xz name; pick one of those suffixes")
    buffer = io.BytesIO()
    options = {"preset": 1} if compression == "xz" else {"compresslevel": 6} if compression == "gz" else {}
    # typeshed's overloads of tarfile.open want a literal mode; this one is computed
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}", **options) as tar:  # type: ignore[call-overload]
        for path in sorted(folder.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(folder).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return atomic_write(archive, lambda tmp: tmp.write_bytes(buffer.getvalue()))
