"""Image pipeline: bytes -> normalised (3, H, W) float tensor.

Size, mean, std, interpolation and crop fraction come from the vision
encoder's timm data config, so a recipe never repeats them; the recipe's
``[data.image]`` table adds the paper augmentations (``ImageConfig``).

Training: RandomResizedCrop(size, scale, ratio) -> horizontal flip ->
RandAugment -> normalise. Evaluation: resize the short side to
size / crop_pct, centre crop, normalise (timm's eval transform).

Randomness comes from torch's global generator; the streams seed it per
sample (``seeded``) so that a sample's augmentation depends only on the run
seed, the epoch and the sample's key, not on which worker decoded it.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

if TYPE_CHECKING:
    from vlforge.data import ImageConfig

# ALBEF's RandAugment ops: no colour changes, because captions name colours (methods.md §2.6).
COLOUR_FREE_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAGNITUDE_LEVELS = 10  # RandAugment magnitude M is on 0..10, as in the papers


class UndecodableImage(ValueError):
    """The bytes are not an image Pillow can decode (or the image is truncated)."""


class ColourFreeRandAugment(v2.RandAugment):
    """torchvision's RandAugment restricted to ``COLOUR_FREE_OPS``."""

    _AUGMENTATION_SPACE = {
        name: op for name, op in v2.RandAugment._AUGMENTATION_SPACE.items() if name in COLOUR_FREE_OPS
    }


def decode(data: bytes) -> torch.Tensor:
    """Encoded image (JPEG, PNG, WEBP, GIF, ...) -> (3, H, W) uint8 RGB.

    Pillow, not torchvision.io: torchvision deprecated its decoders in 0.29.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.array(image.convert("RGB"))  # (H, W, 3) uint8; convert() loads every byte
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UndecodableImage(f"{type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) view


class ImagePipeline:
    """Picklable bytes -> (3, size, size) float32 transform (goes to DataLoader workers)."""

    def __init__(self, config: ImageConfig, data_config: dict[str, Any], *, train: bool) -> None:
        self.size = config.size or int(data_config["input_size"][-1])
        interpolation = v2.InterpolationMode(data_config.get("interpolation", "bicubic"))
        steps: list[Any]
        if train and config.crop == "random":
            steps = [
                v2.RandomResizedCrop(
                    self.size,
                    scale=tuple(config.crop_scale),
                    ratio=tuple(config.crop_ratio),
                    interpolation=interpolation,
                    antialias=True,
                )
            ]
        else:
            resize = int(self.size / float(data_config.get("crop_pct", 1.0)))
            steps = [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(self.size)]
        if train and config.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(config.hflip))
        if train and config.randaugment_ops > 0:
            augment = v2.RandAugment if config.randaugment_colour else ColourFreeRandAugment
            steps.append(
                augment(
                    num_ops=config.randaugment_ops,
                    magnitude=config.randaugment_magnitude,
                    num_magnitude_bins=MAGNITUDE_LEVELS + 1,
                    interpolation=v2.InterpolationMode.BILINEAR,  # affine ops on tensors: no bicubic
                )
            )
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"])),
        ]
        self.transform = v2.Compose(steps)

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform(decode(data))  # (3, size, size)


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed from (run seed, epoch, sample key); stable across processes (no ``hash()``)."""
    return int(
        np.random.SeedSequence([seed, epoch, zlib.crc32(key.encode())]).generate_state(2, np.uint64)[0] >> 1
    )


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU generator seeded to ``seed``; the previous state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(
            seed
        )  # CPU only: torch.manual_seed also seeds every device (~50x slower)
        yield
