"""data components (registered by vlforge.builtin).

This module stays light (no torch import): it holds the config models and
registers factories that import the heavy code when called. docs/data.md
describes the formats, every key below and the resume and bad-data rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlforge.paths import RecipePath
from vlforge.registry import ComponentConfig, Registry

if TYPE_CHECKING:
    from vlforge.components import BuildContext


SHAPES_LABELS = ("shape", "color", "position", "size")  # vlforge.data.synthetic.ATTRIBUTES' names


class ShapesConfig(ComponentConfig):
    """``[data] type = "synthetic.shapes"``: generated images of one coloured shape."""

    seed: int = Field(0, ge=0, description="item i of a split is a pure function of (seed, split, i)")
    train_size: int = Field(20_000, ge=1, description="items in the 'train' split")
    val_size: int = Field(512, ge=1, description="items in the held-out 'val' split")
    test_size: int = Field(512, ge=1, description="items in the held-out 'test' split")
    image_size: int | None = Field(
        None, ge=8, description="side in pixels; default: the vision encoder's data_config input size"
    )
    background_noise: float = Field(
        0.05, ge=0.0, description="std of Gaussian pixel noise, in units of the full 0..255 range"
    )

    def held_out_splits(self) -> list[str]:
        return ["train", "val", "test"]

    def label_names(self) -> list[str]:
        return list(SHAPES_LABELS)


def build_shapes(config: ShapesConfig, ctx: BuildContext) -> Any:
    """Generated images of one coloured shape, with captions that describe them exactly."""
    from vlforge.data.synthetic import ShapesData

    return ShapesData.from_context(config, ctx)


# --------------------------------------------------------------------------- shared tables

UrlList = (
    RecipePath | list[RecipePath]
)  # relative to the recipe; brace patterns allowed: "s3://b/{00000..00099}.tar"


class ImageConfig(ComponentConfig):
    """``[data.image]``: train augmentations on top of the vision encoder's own preprocessing.

    Size, mean, std, interpolation and crop fraction come from the encoder's
    timm data config. Paper settings: FLIP ``crop_scale = [0.5, 1.0]``,
    ``hflip = 0.5``; ALBEF ``crop_scale = [0.2, 1.0]``, ``hflip = 0.5``,
    ``randaugment_ops = 2``, ``randaugment_magnitude = 7``.
    """

    size: int | None = Field(None, ge=8, description="side in pixels; default: the encoder's input size")
    crop: Literal["random", "center"] = Field(
        "random", description="random: RandomResizedCrop; center: resize + centre crop, as at eval"
    )
    crop_scale: tuple[float, float] = Field((0.9, 1.0), description="RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect range")
    hflip: float = Field(0.0, ge=0.0, le=1.0, description="probability of a horizontal flip")
    randaugment_ops: int = Field(0, ge=0, description="RandAugment N (ops per image); 0: off")
    randaugment_magnitude: int = Field(7, ge=0, le=10, description="RandAugment M on 0..10")
    randaugment_colour: bool = Field(
        False, description="include colour ops (Color, Contrast, Posterize, Solarize); off as in ALBEF"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ImageConfig:
        for name in ("crop_scale", "crop_ratio"):
            low_high = getattr(self, name)
            if not 0 < low_high[0] <= low_high[1]:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high (got {list(low_high)})")
        return self


class BadDataConfig(ComponentConfig):
    """``[data.bad_data]``: when skipped samples and broken shards stop the run."""

    max_skipped_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="stop when more than this fraction of the samples read was skipped"
    )
    max_failed_shard_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="stop when more than this fraction of shards failed to read"
    )
    min_samples: int = Field(
        1000, ge=0, description="samples read (per rank) before the fractions are checked"
    )


class StreamConfig(ComponentConfig):
    """Keys every streaming source has."""

    shuffle: bool = Field(True, description="shuffle the data per epoch (seeded by the run's seed)")
    collate: str | None = Field(
        None, description="'module:factory' returning the batch collate (a plugin's formatting); see docs"
    )
    image: ImageConfig = Field(default_factory=ImageConfig)
    bad_data: BadDataConfig = Field(default_factory=BadDataConfig)


class ShardStreamConfig(StreamConfig):
    """Keys of sources read from shard files (tar or JSONL), whose sizes are not known up front."""

    shuffle_block: int = Field(
        1000, ge=1, description="samples of a shard permuted together (memory: this many raw samples)"
    )
    num_samples: int | None = Field(
        None, ge=1, description="samples per epoch (epoch length only); default: sizes.json or an estimate"
    )


# --------------------------------------------------------------------------- sources


class WebDatasetConfig(ShardStreamConfig):
    """``[data] type = "webdataset"``: image-text pairs in tar shards (img2dataset layout)."""

    urls: UrlList = Field(..., description="train shards: paths or fsspec URLs, brace patterns allowed")
    splits: dict[str, UrlList] = Field(
        default_factory=dict, description="held-out shards by split name (read into memory for evaluators)"
    )
    image_fields: list[str] = Field(
        ["jpg", "jpeg", "png", "webp"], description="fields tried in order for the image"
    )
    caption_field: str = Field("txt", description="field holding the caption")
    max_words: int | None = Field(None, ge=1, description="cut captions to this many words (ALBEF: 30)")
    class_field: str | None = Field(
        None, description="held-out splits: field holding an integer class label ('cls'), for zero-shot"
    )

    def held_out_splits(self) -> list[str]:
        return list(self.splits)

    def label_names(self) -> list[str]:
        return ["class"] if self.class_field else []


class CaptionsConfig(StreamConfig):
    """``[data] type = "captions"``: JSON/JSONL lists of {image, caption(s)} as ALBEF uses."""

    files: UrlList = Field(..., description="train caption files (JSON list or JSON lines)")
    image_root: RecipePath = Field(
        "", description="folder/URL images are relative to; default: each file's folder"
    )
    splits: dict[str, UrlList] = Field(
        default_factory=dict, description="held-out caption files by split name (for evaluators)"
    )
    chunk_size: int = Field(1000, ge=1, description="entries per unit (what readers split and resume by)")
    max_words: int | None = Field(None, ge=1, description="cut captions to this many words (ALBEF: 30)")

    def held_out_splits(self) -> list[str]:
        return list(self.splits)

    def label_names(self) -> list[str]:
        return []


class InterleavedConfig(ShardStreamConfig):
    """``[data] type = "interleaved"``: MMC4-style documents (JSONL) of sentences and images."""

    files: UrlList = Field(..., description="JSONL files of documents, one document per line")
    image_root: RecipePath = Field(
        "", description="folder/URL of image_name files; default: each file's folder"
    )
    max_images: int = Field(6, ge=1, description="images kept per document (OpenFlamingo: 6)")
    min_similarity: float | None = Field(
        None, description="drop images whose matched_sim is below this (OpenFlamingo MMC4: 0.24)"
    )


class ImageFolderConfig(ComponentConfig):
    """``[data] type = "imagefolder"``: labelled images, ``<split folder>/<class>/<image>`` (torchvision)."""

    splits: dict[str, RecipePath] = Field(
        ..., description="split name -> folder of class folders (path or URL)"
    )
    image: ImageConfig = Field(default_factory=ImageConfig)

    def held_out_splits(self) -> list[str]:
        return list(self.splits)

    def label_names(self) -> list[str]:
        return ["class"]


class VQAConfig(ComponentConfig):
    """``type = "vqa"``: visual question answering files, held-out splits for evaluators (VQAv2)."""

    splits: dict[str, UrlList] = Field(
        ...,
        description="split name -> JSONL file(s) of {image, question, answers}, or the official "
        "VQAv2 [questions JSON, annotations JSON] pair",
    )
    image_root: RecipePath = Field(
        "", description="folder/URL images are relative to; default: each file's folder"
    )
    image: ImageConfig = Field(default_factory=ImageConfig)

    def held_out_splits(self) -> list[str]:
        return list(self.splits)

    def label_names(self) -> list[str]:
        return []


class MixSourceTable(BaseModel):
    """One ``[data.sources.<name>]`` table: a dataset component plus its share of the mix."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    type: str = Field(..., description="a registered dataset")
    weight: float = Field(1.0, gt=0.0, description="relative share of micro-batches (mode 'sample')")
    micro_batch: int | None = Field(None, ge=1, description="samples per micro-batch; default the run's")


class MixConfig(ComponentConfig):
    """``[data] type = "mix"``: micro-batches from several datasets, each batch from one of them."""

    sources: dict[str, MixSourceTable] = Field(..., min_length=1, description="name -> dataset table")
    mode: Literal["sample", "cycle"] = Field(
        "sample", description="sample: each micro-batch's source drawn by weight; cycle: in turn, in order"
    )
    eval_source: str | None = Field(None, description="source whose splits evaluators use; default the first")

    @model_validator(mode="after")
    def _known_eval_source(self) -> MixConfig:
        if self.eval_source is not None and self.eval_source not in self.sources:
            raise ValueError(f"eval_source '{self.eval_source}' is not one of {sorted(self.sources)}")
        return self


def build_webdataset(config: WebDatasetConfig, ctx: BuildContext) -> Any:
    """Image-text pairs streamed from WebDataset tar shards over fsspec (resumable, split by rank/worker)."""
    from vlforge.data.webdataset import WebDatasetSource

    return WebDatasetSource.from_context(config, ctx)


def build_captions(config: CaptionsConfig, ctx: BuildContext) -> Any:
    """Image-text pairs from JSON/JSONL caption files, images relative to a root URL."""
    from vlforge.data.captions import CaptionsSource

    return CaptionsSource.from_context(config, ctx)


def build_interleaved(config: InterleavedConfig, ctx: BuildContext) -> Any:
    """Interleaved image-text documents (MMC4-style JSONL) parsed for a plugin's collate."""
    from vlforge.data.interleaved import InterleavedSource

    return InterleavedSource.from_context(config, ctx)


def build_imagefolder(config: ImageFolderConfig, ctx: BuildContext) -> Any:
    """Labelled images in class folders (ImageNet val as usually unpacked), for zero-shot evaluation."""
    from vlforge.data.imagefolder import ImageFolderSource

    return ImageFolderSource.from_context(config, ctx)


def build_vqa(config: VQAConfig, ctx: BuildContext) -> Any:
    """Questions with their annotators' answers (VQAv2 JSONL or the official pair), for evaluators."""
    from vlforge.data.vqa import VQASource

    return VQASource.from_context(config, ctx)


def build_mix(config: MixConfig, ctx: BuildContext) -> Any:
    """Several datasets mixed by micro-batch, by weight or in turn."""
    from vlforge.data.mix import MixData

    return MixData.from_context(config, ctx)


def register(registry: Registry) -> None:
    """Add this package's components to the registry."""
    registry.add("dataset", "synthetic.shapes", config=ShapesConfig, factory=build_shapes)
    registry.add("dataset", "webdataset", config=WebDatasetConfig, factory=build_webdataset)
    registry.add("dataset", "captions", config=CaptionsConfig, factory=build_captions)
    registry.add("dataset", "interleaved", config=InterleavedConfig, factory=build_interleaved)
    registry.add("dataset", "mix", config=MixConfig, factory=build_mix)
    registry.add("dataset", "imagefolder", config=ImageFolderConfig, factory=build_imagefolder)
    registry.add("dataset", "vqa", config=VQAConfig, factory=build_vqa)
