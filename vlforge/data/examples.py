"""What data sources hand to collate functions, and the collate hook point.

Pair sources (WebDataset shards, caption files) produce ``ImageText``
examples; the interleaved source produces ``InterleavedDocument``s
(``vlforge.data.interleaved``). A source's ``collate`` turns a list of them
into the batch dict the model sees. The default for pairs gives ``images``
(B, 3, H, W), ``input_ids``/``attention_mask`` (B, L) from the text
encoder's ``tokenize`` (when the run has one), ``captions`` and ``keys``.

A plugin that formats batches itself (e.g. Flamingo's ``<image>caption
<|endofchunk|>`` token sequences) names a factory in the recipe:
``[data] collate = "package.module:make_collate"``. The factory is called
once at build time as ``make_collate(ctx)`` (a ``BuildContext``: the
tokenizer is in ``ctx.parts``) and returns ``collate(examples) -> batch``,
which runs in DataLoader workers: it must be picklable (a module-level
function, a ``functools.partial`` of one, or an instance of a module-level
class), not a closure.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from vlforge.data.sharded import BadSample
from vlforge.data.transforms import ImagePipeline, UndecodableImage, sample_seed, seeded
from vlforge.errors import UserError

if TYPE_CHECKING:
    from vlforge.components import BuildContext

Collate = Callable[[list[Any]], dict[str, Any]]


@dataclass
class ImageText:
    key: str
    image: torch.Tensor  # (3, H, W) float32, normalised
    caption: str
    # Held-out items only (what evaluators read): the image's identity and every caption of it
    # (retrieval counts a match by image id, never by caption text), and class labels.
    image_id: str = ""
    captions: tuple[str, ...] = ()
    labels: dict[str, int] = field(default_factory=dict)


def clean_caption(text: str, max_words: int | None) -> str:
    """Whitespace collapsed, cut to ``max_words`` words (ALBEF cuts to 30 before tokenizing)."""
    words = text.split()
    return " ".join(words[:max_words] if max_words else words)


def load_image(pipeline: ImagePipeline, data: bytes, *, seed: int, epoch: int, key: str) -> torch.Tensor:
    """Decode and transform an image, randomness seeded by (seed, epoch, key); BadSample if undecodable."""
    try:
        with seeded(sample_seed(seed, epoch, key)):
            return pipeline(data)
    except UndecodableImage as exc:
        raise BadSample("undecodable", f"{key}: {exc}") from exc


class PairCollate:
    """ImageText examples -> ``images`` (B,3,H,W), tokens (B,L) if a tokenizer is given, captions, keys.

    Held-out examples add ``image_ids`` (list[str]), ``all_captions`` (list[list[str]]) and
    ``labels`` ({name: (B,) long}) when they carry them.
    """

    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None) -> None:
        self.tokenize = tokenize

    def __call__(self, examples: list[ImageText]) -> dict[str, Any]:
        captions = [example.caption for example in examples]
        batch: dict[str, Any] = {
            "images": torch.stack([example.image for example in examples]),  # (B,3,H,W)
            "captions": captions,
            "keys": [example.key for example in examples],
        }
        if self.tokenize is not None:
            tokens = self.tokenize(captions)
            batch["input_ids"], batch["attention_mask"] = (
                tokens["input_ids"],
                tokens["attention_mask"],
            )  # (B,L)
        if any(example.image_id for example in examples):
            batch["image_ids"] = [example.image_id or example.key for example in examples]
            batch["all_captions"] = [list(example.captions or (example.caption,)) for example in examples]
        if examples and examples[0].labels:
            batch["labels"] = {
                name: torch.tensor([example.labels[name] for example in examples])
                for name in examples[0].labels
            }
        return batch


def resolve_collate(spec: str | None, ctx: BuildContext, default: Collate) -> Collate:
    """The collate named by ``spec`` ("module:factory", called with ``ctx``), or ``default``."""
    if spec is None:
        return default
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"data.collate: cannot load '{spec}' ({type(exc).__name__}: {exc})") from exc
    return factory(ctx)


def tokenizer_of(ctx: BuildContext) -> Callable[[list[str]], dict[str, torch.Tensor]] | None:
    text = ctx.parts.get("text")
    return getattr(text, "tokenize", None)


def data_config_of(ctx: BuildContext, dataset: str) -> dict[str, Any]:
    """The vision encoder's timm data config (size, mean, std, interpolation, crop_pct)."""
    vision = ctx.parts.get("vision")
    if vision is None:
        raise UserError(f"dataset '{dataset}' needs a vision encoder ([model.vision]) for its image pipeline")
    return vision.data_config


def image_text_parts(config: Any, ctx: BuildContext, dataset: str) -> dict[str, Any]:
    """Train/eval image pipelines and the pair collate every image-text source builds the same way."""
    data_config = data_config_of(ctx, dataset)
    return {
        "train_pipeline": ImagePipeline(config.image, data_config, train=True),
        "eval_pipeline": ImagePipeline(config.image, data_config, train=False),
        "collate": resolve_collate(config.collate, ctx, PairCollate(tokenizer_of(ctx))),
    }


class EvalSplit(Dataset):
    """A held-out split in memory as raw samples, decoded on access with the eval pipeline."""

    def __init__(self, raws: list[Any], decode: Callable[[Any], Any]) -> None:
        self.raws = raws
        self.decode = decode

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, index: int) -> Any:
        return self.decode(self.raws[index])
