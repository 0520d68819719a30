"""On-device augmentation of uint8 batches (random crop, flip, normalise) and the seeds behind it.

Every random choice of the data pipeline (the subset, the epoch order, the crops and
flips) comes from a CPU generator seeded by :func:`derive_seed` of names and numbers,
so it is the same in every process, on every device and in every Python version.

>>> derive_seed("order", 0, 1) == derive_seed("order", 0, 1) != derive_seed("order", 0, 2)
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xross.errors import XrossError

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "Augment", "CropFlip", "derive_seed", "seeded_generator"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def derive_seed(*parts: str | float) -> int:
    """A 63-bit seed from ``parts`` by a fixed hash (the same in every process and Python version)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(*parts: str | float) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class CropFlip:
    """Random parameters of an augmented batch, on CPU: crop offsets into the padded images, flips.

    Slicing it (``params[2:4]``) gives the parameters of those samples.
    """

    top: torch.Tensor  # int64 (N,), row offset into the padded image
    left: torch.Tensor  # int64 (N,), column offset into the padded image
    flip: torch.Tensor  # bool (N,), mirror horizontally

    def __getitem__(self, index: slice) -> CropFlip:
        return CropFlip(self.top[index], self.left[index], self.flip[index])


class Augment:
    """Batched, on-device: random crop with zero padding, horizontal flip, normalise.

    The crop pads the uint8 batch with ``crop_padding`` zero pixels on each side and cuts
    every sample at its own offset with one gather op; the flip mirrors the gather's
    column indices for the flipped samples (``torch.where``), so it costs nothing more.
    Normalisation is ``(x / 255 - mean) / std`` in float32. Random numbers come from a
    CPU generator, so a seed gives the same batch on every device.

    >>> augment = Augment()
    >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> out = augment(images, torch.Generator().manual_seed(0))
    >>> out.shape, out.dtype
    (torch.Size([8, 3, 32, 32]), torch.float32)
    >>> torch.equal(augment(images, torch.Generator().manual_seed(0)), out)
    True
    """

    def __init__(
        self,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
        crop_padding: int = 4,
        flip: bool = True,
    ) -> None:
        if len(mean) != len(std):
            raise XrossError(
                f"mean has {len(mean)} channels but std has {len(std)}; give one value per channel to each"
            )
        if crop_padding < 0:
            raise XrossError(f"crop_padding={crop_padding} is negative; pass 0 to turn the random crop off")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop_padding = crop_padding
        self.flip = flip
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"Augment(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
            f"crop_padding={self.crop_padding}, flip={self.flip})"
        )

    def __call__(
        self, images_uint8: torch.Tensor, generator: torch.Generator | None = None, train: bool = True
    ) -> torch.Tensor:
        """Augmented (``train=True``) or only normalised float32 images, on the input's device."""
        return self.apply(images_uint8, self.sample(len(images_uint8), generator) if train else None)

    def sample(self, n: int, generator: torch.Generator | None = None) -> CropFlip:
        """Draw the crop offsets and flips of ``n`` samples from a CPU ``generator``."""
        span = 2 * self.crop_padding + 1
        top = torch.randint(span, (n,), generator=generator)
        left = torch.randint(span, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return CropFlip(top, left, flip)

    def apply(self, images_uint8: torch.Tensor, params: CropFlip | None) -> torch.Tensor:
        """Crop and flip by ``params`` (None: neither), then normalise."""
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise XrossError(
                f"Augment takes uint8 (N, C, H, W) images, got {images_uint8.dtype} {tuple(images_uint8.shape)}"
            )
        images = images_uint8 if params is None else self._crop_flip(images_uint8, params)
        mean, std = self._stats(images.device)
        return images.float().div_(255).sub_(mean).div_(std)

    def _crop_flip(self, images: torch.Tensor, params: CropFlip) -> torch.Tensor:
        n, c, h, w = images.shape
        device = images.device
        pad = self.crop_padding
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        top, left, flip = params.top.to(device), params.left.to(device), params.flip.to(device)
        rows = top[:, None] + torch.arange(h, device=device)  # (N, H)
        cols = left[:, None] + torch.arange(w, device=device)  # (N, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        pixels = rows[:, :, None] * padded.shape[-1] + cols[:, None, :]  # (N, H, W) flat offsets in a padded plane
        return padded.flatten(2).gather(2, pixels.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]
