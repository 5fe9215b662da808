"""Image-text pairs from WebDataset tar shards (img2dataset's LAION layout) over fsspec.

Each sample is ``key.jpg`` (or png/webp) + ``key.txt`` (+ ``key.json``).
Held-out splits also read every caption of an image from ``key.json``'s
``captions`` (what ``vlforge data pack`` writes), and, with ``class_field``
set (``"cls"`` in ImageNet shards), an integer class label; such shards need
no caption. Shards are units of ``vlforge.data.sharded``: shuffled per
epoch, split over (rank, worker), samples permuted in blocks of
``shuffle_block`` within a shard, positions saved to the sample.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from vlforge.data.examples import (
    EvalSplit,
    ImageText,
    clean_caption,
    image_text_parts,
    load_image,
)
from vlforge.data.sharded import (
    BadSample,
    FileUnit,
    StreamingSource,
    count_samples,
    file_units,
    shuffled_blocks,
)
from vlforge.data.tar import KEY_FIELD, BadShard, read_samples
from vlforge.data.transforms import ImagePipeline
from vlforge.data.urls import expand_urls
from vlforge.errors import UserError

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.data import WebDatasetConfig


class WebDatasetSource(StreamingSource):
    """The ``webdataset`` data source: a streaming train split plus in-memory held-out splits."""

    def __init__(
        self,
        config: WebDatasetConfig,
        *,
        train_pipeline: ImagePipeline,
        eval_pipeline: ImagePipeline,
        collate: Any,
    ) -> None:
        self.config = config
        self.bad_data = config.bad_data
        self.urls = expand_urls(config.urls)
        if not self.urls:
            raise UserError("data.urls names no shard")
        self.train_pipeline, self.eval_pipeline = train_pipeline, eval_pipeline
        self.collate = collate
        self._num_samples: int | None = None

    @classmethod
    def from_context(cls, config: WebDatasetConfig, ctx: BuildContext) -> WebDatasetSource:
        return cls(config, **image_text_parts(config, ctx, "webdataset"))

    # ------------------------------------------------------------------ streaming

    def units(self, epoch: int, seed: int) -> list[FileUnit]:
        return file_units(self.urls, seed, epoch, self.config.shuffle)

    def read(self, unit: FileUnit, start: int) -> Iterator[dict[str, Any]]:
        return shuffled_blocks(read_samples(unit.url), self.config.shuffle_block, unit.shuffle_seed, start)

    def decode(self, raw: dict[str, Any], seed: int, epoch: int, counts: Counter[str]) -> ImageText:
        return self._example(raw, self.train_pipeline, seed=seed, epoch=epoch)

    def num_samples(self) -> int:
        if self._num_samples is None:  # counted once: without sizes.json it reads a shard
            self._num_samples = self.config.num_samples or count_samples(self.urls, _count_shard)
        return self._num_samples

    def _example(self, raw: dict[str, Any], pipeline: ImagePipeline, *, seed: int, epoch: int) -> ImageText:
        key = raw[KEY_FIELD]
        image = next((raw[field] for field in self.config.image_fields if field in raw), None)
        if image is None:
            raise BadSample("missing_image", f"{key}: none of {self.config.image_fields}")
        caption = clean_caption(
            raw.get(self.config.caption_field, b"").decode("utf-8", "replace"), self.config.max_words
        )
        if not caption:
            raise BadSample("missing_caption", f"{key}: no '{self.config.caption_field}' text")
        return ImageText(key, load_image(pipeline, image, seed=seed, epoch=epoch, key=key), caption)

    # ------------------------------------------------------------------ held-out splits

    def dataset(self, split: str) -> EvalSplit:
        """A held-out split read whole into memory (raw bytes), decoded with the eval pipeline."""
        if split not in self.config.splits:
            raise UserError(
                f"webdataset has no split '{split}' (data.splits: {', '.join(self.config.splits) or 'none'})"
            )
        try:
            raws = [sample for url in expand_urls(self.config.splits[split]) for sample in read_samples(url)]
        except BadShard as exc:
            raise UserError(f"held-out split '{split}': {exc.kind} shard: {exc}") from exc
        return EvalSplit(raws, functools.partial(self._held_out, split))

    def _held_out(self, split: str, raw: dict[str, Any]) -> ImageText:
        key, class_field = raw[KEY_FIELD], self.config.class_field
        labels = {}
        if class_field is not None:
            if class_field not in raw:
                raise UserError(
                    f"held-out split '{split}': sample {key} has no '{class_field}' (data.class_field)"
                )
            labels["class"] = int(raw[class_field].decode().strip())
            raw = {self.config.caption_field: b"-", **raw}  # a classification shard has no caption
        try:
            example = self._example(raw, self.eval_pipeline, seed=0, epoch=0)
        except BadSample as exc:
            raise UserError(f"held-out split '{split}': {exc.kind} sample {exc}") from exc
        captions = json.loads(raw["json"]).get("captions", ()) if "json" in raw else ()
        captions = tuple(clean_caption(text, self.config.max_words) for text in captions) or (
            example.caption,
        )
        example.image_id, example.captions, example.labels = key, captions, labels
        return example


def _count_shard(url: str) -> int:
    return sum(1 for _ in read_samples(url))
