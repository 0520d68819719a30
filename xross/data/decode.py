"""Decoding a listed split into one uint8 ``(N, 3, H, W)`` tensor: :class:`ImageTensors`.

JPEGs go through torchvision's fast decoder, every other format (and a JPEG it refuses)
through PIL; every image becomes RGB. Images of different sizes are resized together,
size by size, when an ``image_size`` is given.

>>> import io
>>> from PIL import Image
>>> buffer = io.BytesIO()
>>> Image.new("L", (3, 2), 7).save(buffer, format="PNG")
>>> decode(bytearray(buffer.getvalue()), "grey.png").shape
torch.Size([3, 2, 3])
"""

from __future__ import annotations

import io
import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from xross.data.progress import DelayedProgress
from xross.data.sources import Listing
from xross.errors import XrossError

__all__ = ["ImageTensors", "decode", "decode_all", "resize", "stack"]

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not a dependency yet)
_TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class ImageTensors:
    """A decoded split: uint8 images ``(N, 3, H, W)`` (contiguous), int64 labels ``(N,)``, class names.

    ``labels[i]`` indexes ``classes``, which are in ImageFolder order (sorted folder names).

    >>> data = ImageTensors(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["cat", "dog"])
    >>> len(data)
    2
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    split: str | None = None  # the split folder they were read from, when known

    def __len__(self) -> int:
        return self.labels.shape[0]


def decode_all(listing: Listing, keep: torch.Tensor, progress: bool) -> list[torch.Tensor]:
    """Decode the images at ``keep`` into uint8 RGB ``(3, H, W)`` tensors."""
    images = []
    with DelayedProgress(f"decoding {len(keep)} images", len(keep), progress) as bar, warnings.catch_warnings():
        warnings.filterwarnings("ignore", _TORCHVISION_IO_DEPRECATION, DeprecationWarning)
        for done, i in enumerate(keep.tolist(), start=1):
            payload = listing.payloads[i]
            data = payload if isinstance(payload, bytearray) else bytearray(payload.read_bytes())
            images.append(decode(data, listing.names[i]))
            bar.update(done)
    return images


def decode(data: bytearray, name: str) -> torch.Tensor:
    """A uint8 RGB ``(3, H, W)`` image: torchvision's fast decoder for JPEG, PIL for the rest.

    torchvision's PNG decoder can crash the process on a damaged file (pytorch/vision#3613,
    #6456); its JPEG decoder fails cleanly, so it keeps the common case fast.
    """
    if data[: len(_JPEG_MAGIC)] == _JPEG_MAGIC:
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL may read it; if not, the error below names the file
    return _decode_with_pil(data, name)


def _decode_with_pil(data: bytearray, name: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode.startswith("I;16"):  # 16-bit grey: keep the high byte (PIL would clip)
                pixels = np.repeat((np.array(image) >> 8).astype(np.uint8)[..., None], 3, axis=2)
            else:
                pixels = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise XrossError(f"cannot decode image '{name}' ({e}); replace or remove that file") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def stack(images: list[torch.Tensor], image_size: int | None) -> torch.Tensor:
    """One uint8 ``(N, 3, S, S)`` batch; images of each size are resized together."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for position, image in enumerate(images):
        by_size.setdefault((image.shape[1], image.shape[2]), []).append(position)
    if image_size is None:
        if len(by_size) > 1:
            sizes = ", ".join(f"{h}x{w}" for h, w in itertools.islice(by_size, 4))
            raise XrossError(
                f"the images have {len(by_size)} different sizes (e.g. {sizes}); "
                "pass image_size=N to resize them all to NxN"
            )
        return torch.stack(images)
    batch = torch.empty((len(images), 3, image_size, image_size), dtype=torch.uint8)
    for positions in by_size.values():
        batch[positions] = resize(torch.stack([images[p] for p in positions]), image_size)
    return batch


def resize(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize a uint8 batch to ``image_size x image_size`` (antialiased) unless it has that size already."""
    if image_size is None or images.shape[-2:] == (image_size, image_size):
        return images
    return TF.resize(images, [image_size, image_size], antialias=True)
