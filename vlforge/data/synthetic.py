"""Generated image-text pairs: one coloured shape on a grey background.

Each image shows one shape (6 kinds) in one colour (8), in one cell of a 3x3
grid, in one of two sizes; its caption names all four attributes, so a
caption fully determines what is visible (and nothing else is). The
background is plain grey plus optional Gaussian pixel noise.

Item ``i`` of a split is a pure function of ``(seed, split, i)``: it is drawn
from its own ``numpy`` Generator seeded with that triple, never from global
RNG state. Any rank or worker can produce any item, and a resumed run sees
exactly the items it would have seen. ``val`` and ``test`` use their own seed
streams, so they are held out from ``train`` (their images can still repeat a
train image's attributes: there are only 864 combinations).

Train captions vary over ``CAPTION_TEMPLATES``; ``val`` and ``test`` captions
all use the first (canonical) template, so that two held-out captions are
identical exactly when their images show the same attributes, which is what
the retrieval evaluator counts as a match: an item's image id (``image_ids``
in a batch) is its attribute combination, since two renders of the same
attributes differ only by pixel noise.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.data import ShapesConfig

# Every word is consonant-initial, so the article "a" is always right.
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 190),
    "cyan": (40, 220, 230),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
POSITIONS = (  # row-major over the 3x3 grid
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
SIZES = ("small", "large")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "position": POSITIONS,
    "size": SIZES,
}

CAPTION_TEMPLATES = (
    "a {size} {color} {shape} at the {position}",  # canonical: the only one in val and test
    "a photo of a {size} {color} {shape} at the {position}",
    "a picture of a {size} {color} {shape} at the {position}",
    "there is a {size} {color} {shape} at the {position}",
    "the {shape} at the {position} is {size} and {color}",
)
SPLITS = ("train", "val", "test")

BACKGROUND = 128  # grey, so that both white and black shapes stand out
SIZE_FRACTIONS = (0.3, 0.46)  # shape half-extent as a fraction of the grid cell, per size

# Shape masks on coordinates (u, v) scaled so the shape's half-extent is 1; v grows downwards.
_SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u**2 + v**2 <= 1.0,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.85,
    "triangle": lambda u, v: (abs(v) <= 1.0) & (abs(u) <= (v + 1.0) / 2),  # apex up
    "diamond": lambda u, v: abs(u) + abs(v) <= 1.0,
    "cross": lambda u, v: (np.minimum(abs(u), abs(v)) <= 0.3) & (np.maximum(abs(u), abs(v)) <= 1.0),
    "ring": lambda u, v: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.3),
}
_COLOR_VALUES = np.array(list(COLORS.values()), dtype=np.uint8)  # (colors, 3)


def _words(texts: list[str]) -> set[str]:
    return {word for text in texts for word in text.replace("{", " {").split() if "{" not in word}


# Every word a caption or a zero-shot prompt can use: the `vlforge:shapes` tokenizer's vocabulary.
VOCABULARY: list[str] = sorted(
    _words(list(CAPTION_TEMPLATES)) | _words([name for names in ATTRIBUTES.values() for name in names])
)


@cache
def shape_masks(image_size: int) -> np.ndarray:
    """(shapes, sizes, positions, H, W) bool: every drawable shape, precomputed once per size."""
    cell = image_size / 3
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5  # pixel centres
    masks = np.zeros((len(SHAPES), len(SIZES), len(POSITIONS), image_size, image_size), dtype=bool)
    for p in range(len(POSITIONS)):
        cy, cx = (p // 3 + 0.5) * cell, (p % 3 + 0.5) * cell
        for s, fraction in enumerate(SIZE_FRACTIONS):
            radius = fraction * cell
            u, v = (xs - cx) / radius, (ys - cy) / radius
            for k, shape in enumerate(SHAPES):
                masks[k, s, p] = _SHAPE_MASKS[shape](u, v)
    return masks


def draw(
    shape: int,
    color: int,
    position: int,
    size: int,
    *,
    image_size: int,
    noise: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """(H, W, 3) uint8 image of one shape; ``noise`` is the pixel noise std in units of 255."""
    image = np.full((image_size, image_size, 3), BACKGROUND, dtype=np.uint8)
    image[shape_masks(image_size)[shape, size, position]] = _COLOR_VALUES[color]
    if noise > 0:
        noisy = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise * 255)
        image = np.clip(noisy, 0, 255).astype(np.uint8)
    return image


class ShapesDataset(Dataset):
    """One split: item ``i`` is ``{"image": (H,W,3) uint8, "caption", "labels", "key"}``."""

    def __init__(self, *, seed: int, split: str, length: int, image_size: int, noise: float) -> None:
        self.seed = seed
        self.split = split
        self.length = length
        self.image_size = image_size
        self.noise = noise

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for split '{self.split}' of {self.length} items")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        labels = {name: int(rng.integers(len(values))) for name, values in ATTRIBUTES.items()}
        # Held-out captions are canonical so that identical captions mean identical images.
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES)) if self.split == "train" else 0]
        caption = template.format(**{name: ATTRIBUTES[name][i] for name, i in labels.items()})
        image = draw(**labels, image_size=self.image_size, noise=self.noise, rng=rng)
        return {"image": image, "caption": caption, "labels": labels, "key": f"{self.split}/{index}"}


class ShapesData:
    """The ``synthetic.shapes`` data source (``DataSourceLike``) plus zero-shot class names and prompts."""

    def __init__(
        self,
        config: ShapesConfig,
        *,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
    ) -> None:
        self.config = config
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.tokenize = tokenize
        self.lengths = {"train": config.train_size, "val": config.val_size, "test": config.test_size}

    @classmethod
    def from_context(cls, config: ShapesConfig, ctx: BuildContext) -> ShapesData:
        """Image size and normalisation from ``parts["vision"]``, tokens from ``parts["text"]``."""
        missing = [part for part in ("vision", "text") if part not in ctx.parts]
        if missing:
            raise ValueError(
                f"dataset 'synthetic.shapes' needs the {' and '.join(missing)} encoder built first "
                f"(parts built so far: {', '.join(ctx.parts) or 'none'})"
            )
        data_config = ctx.parts["vision"].data_config
        return cls(
            config,
            image_size=config.image_size or int(data_config["input_size"][-1]),
            mean=tuple(data_config["mean"]),
            std=tuple(data_config["std"]),
            tokenize=ctx.parts["text"].tokenize,
        )

    def dataset(self, split: str) -> ShapesDataset:
        if split not in self.lengths:
            raise ValueError(f"unknown split '{split}' of synthetic.shapes (valid: {', '.join(SPLITS)})")
        return ShapesDataset(
            seed=self.config.seed,
            split=split,
            length=self.lengths[split],
            image_size=self.image_size,
            noise=self.config.background_noise,
        )

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Items -> batch: normalised ``images`` (B,3,H,W), tokens (B,L), captions, keys, labels (B,)."""
        pixels = torch.from_numpy(np.stack([item["image"] for item in items]))  # (B,H,W,3) uint8
        images = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        images = images.div_(255).sub_(self.mean).div_(self.std)  # (B,3,H,W)
        captions = [item["caption"] for item in items]
        tokens = self.tokenize(captions)
        return {
            "images": images,
            "input_ids": tokens["input_ids"],  # (B,L)
            "attention_mask": tokens["attention_mask"],  # (B,L)
            "captions": captions,
            "keys": [item["key"] for item in items],
            "image_ids": [image_id(item["labels"]) for item in items],
            "all_captions": [[caption] for caption in captions],
            "labels": {name: torch.tensor([item["labels"][name] for item in items]) for name in ATTRIBUTES},
        }

    def class_names(self, attribute: str, split: str = "val") -> list[str]:
        """Names of the classes of ``attribute``, in label order (the same in every split)."""
        return list(_attribute_values(attribute))

    def prompt_templates(self, attribute: str) -> list[str]:
        """Zero-shot prompts for ``attribute``, each with ``{}`` where a class name goes.

        The canonical caption with every combination of the other attributes
        filled in: a class embedding (the mean over its prompts) is then the
        average of every held-out caption of that class.
        """
        _attribute_values(attribute)
        others = [name for name in ATTRIBUTES if name != attribute]
        templates = []
        for values in itertools.product(*(ATTRIBUTES[name] for name in others)):
            fields = dict(zip(others, values), **{attribute: "{}"})
            templates.append(CAPTION_TEMPLATES[0].format(**fields))
        return templates


def image_id(labels: dict[str, int]) -> str:
    """What an image shows, as its identity: ``"shape=0,color=3,position=8,size=1"``."""
    return ",".join(f"{name}={labels[name]}" for name in ATTRIBUTES)


def _attribute_values(attribute: str) -> tuple[str, ...]:
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute '{attribute}' (valid: {', '.join(ATTRIBUTES)})")
    return ATTRIBUTES[attribute]
