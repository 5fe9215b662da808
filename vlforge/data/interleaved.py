"""Interleaved image-text documents (MMC4 / M3W style) from JSONL files.

One document per line, in MMC4's fields::

    {"text_list": ["First sentence.", "Second one.", ...],
     "image_info": [{"image_name": "a1.jpg", "matched_text_index": 1, "matched_sim": 0.31},
                    {"image_base64": "/9j/4AAQ...", "matched_text_index": 0}]}

An image is read from ``image_base64`` when present (as in OpenFlamingo's
MMC4 shards), else from ``image_root``/``image_name``. Image ``j`` belongs
right before sentence ``matched_text_index``. Images whose ``matched_sim``
is under ``min_similarity`` are dropped (those without one are kept); at
most ``max_images`` are kept, in document order; images that cannot be read
or decoded are dropped and counted (``data/images_dropped``); a document
left without images is skipped.

This module only parses: each example is an ``InterleavedDocument`` (images
already through the encoder's pipeline). Turning documents into token
sequences is the model plugin's job, through the ``collate`` hook point
(``vlforge.data.examples``): ``make_collate(ctx)`` returns a function of a
list of documents. Without one, ``collate_documents`` gives images padded
to (B, M, 3, H, W) with a mask, plus the sentences and assignments as lists.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from vlforge.data.examples import data_config_of, load_image, resolve_collate
from vlforge.data.sharded import (
    BadSample,
    FileUnit,
    StreamingSource,
    count_samples,
    file_units,
    shuffled_blocks,
)
from vlforge.data.tar import BadShard, failure_kind
from vlforge.data.transforms import ImagePipeline
from vlforge.data.urls import expand_urls, join_url, open_for_reading, parent_url, read_bytes
from vlforge.errors import UserError

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.data import InterleavedConfig


@dataclass
class InterleavedDocument:
    key: str
    sentences: list[str]
    images: list[torch.Tensor]  # each (3, H, W) float32, normalised, in document order
    image_sentence: list[int]  # image j comes right before sentences[image_sentence[j]] (non-decreasing)


class RawDocument(NamedTuple):
    key: str  # "<file stem>/<line index>"
    line: str
    image_root: str


def read_documents(url: str, image_root: str = "") -> Iterator[RawDocument]:
    """The non-empty lines of a JSONL (or .jsonl.gz) file, unparsed; damage raises ``BadShard``."""
    root = image_root or parent_url(url)
    stem = url.rsplit("/", 1)[-1].split(".", 1)[0]
    started = False
    try:
        with open_for_reading(url) as raw:
            lines = _text_lines(gzip.GzipFile(fileobj=raw) if url.endswith(".gz") else raw)
            for index, line in enumerate(lines):
                if line.strip():
                    started = True
                    yield RawDocument(f"{stem}/{index}", line, root)
    except Exception as exc:  # anything raised while reading the file's bytes is the file's failure
        raise BadShard(failure_kind(exc, started), f"{url}: {type(exc).__name__}: {exc}") from exc


def _text_lines(stream: Any) -> Iterator[str]:
    for line in stream:
        yield line.decode("utf-8", "replace")


def collate_documents(documents: list[InterleavedDocument]) -> dict[str, Any]:
    """Default collate: ``images`` (B, M, 3, H, W) zero-padded, ``image_mask`` (B, M), text as lists."""
    images, mask = stack_images(documents)
    return {
        "images": images,
        "image_mask": mask,
        "sentences": [document.sentences for document in documents],
        "image_sentence": [document.image_sentence for document in documents],
        "keys": [document.key for document in documents],
    }


def stack_images(documents: list[InterleavedDocument]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, 3, H, W) images, zero where a document has fewer than M = max images; (B, M) bool mask."""
    count = max(len(document.images) for document in documents)
    shape = documents[0].images[0].shape  # (3, H, W)
    images = torch.zeros(len(documents), count, *shape)
    mask = torch.zeros(len(documents), count, dtype=torch.bool)
    for row, document in enumerate(documents):
        images[row, : len(document.images)] = torch.stack(document.images)
        mask[row, : len(document.images)] = True
    return images, mask


class InterleavedSource(StreamingSource):
    """The ``interleaved`` data source: streams parsed documents (train only)."""

    def __init__(self, config: InterleavedConfig, *, pipeline: ImagePipeline, collate: Any) -> None:
        self.config = config
        self.bad_data = config.bad_data
        self.urls = expand_urls(config.files)
        if not self.urls:
            raise UserError("data.files names no file")
        self.pipeline = pipeline
        self.collate = collate
        self._num_samples: int | None = None

    @classmethod
    def from_context(cls, config: InterleavedConfig, ctx: BuildContext) -> InterleavedSource:
        return cls(
            config,
            pipeline=ImagePipeline(config.image, data_config_of(ctx, "interleaved"), train=True),
            collate=resolve_collate(config.collate, ctx, collate_documents),
        )

    def units(self, epoch: int, seed: int) -> list[FileUnit]:
        return file_units(self.urls, seed, epoch, self.config.shuffle)

    def read(self, unit: FileUnit, start: int) -> Iterator[RawDocument]:
        documents = read_documents(unit.url, self.config.image_root)
        return shuffled_blocks(documents, self.config.shuffle_block, unit.shuffle_seed, start)

    def decode(self, raw: RawDocument, seed: int, epoch: int, counts: Counter[str]) -> InterleavedDocument:
        try:
            document = json.loads(raw.line)
        except ValueError as exc:
            raise BadSample("unparsable", f"{raw.key}: {exc}") from exc
        sentences = [text for text in document.get("text_list") or [] if isinstance(text, str)]
        if not sentences:
            raise BadSample("missing_text", raw.key)
        images, places = [], []
        for index, info in enumerate(self._candidates(document, len(sentences))):
            if len(images) == self.config.max_images:
                break
            try:
                data = _image_data(info, raw.image_root)
                key = f"{raw.key}#{index}"
                images.append(load_image(self.pipeline, data, seed=seed, epoch=epoch, key=key))
            except (OSError, ValueError, BadSample):
                counts["images_dropped"] += 1
                continue
            places.append(int(info["matched_text_index"]))
        if not images:
            raise BadSample("no_images", raw.key)
        return InterleavedDocument(raw.key, sentences, images, places)

    def _candidates(self, document: dict[str, Any], sentences: int) -> list[dict[str, Any]]:
        """The document's images in text order, above the similarity floor and placed in the text."""
        threshold = self.config.min_similarity
        infos = [
            info
            for info in document.get("image_info") or []
            if isinstance(info, dict)
            and isinstance(info.get("matched_text_index"), int)
            and 0 <= info["matched_text_index"] < sentences
            and (threshold is None or info.get("matched_sim", threshold) >= threshold)  # none given: kept
        ]
        return sorted(infos, key=lambda info: info["matched_text_index"])

    def num_samples(self) -> int:
        if self._num_samples is None:
            self._num_samples = self.config.num_samples or count_samples(self.urls, _count_documents)
        return self._num_samples

    def dataset(self, split: str) -> Any:
        raise UserError(
            "interleaved documents have no held-out splits; evaluate on a pair dataset "
            "(e.g. a mix with eval_source naming a webdataset or captions source)"
        )


def _image_data(info: dict[str, Any], root: str) -> bytes:
    if "image_base64" in info:
        try:
            return base64.b64decode(info["image_base64"], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"bad base64 image: {exc}") from exc
    if "image_name" not in info:
        raise ValueError("image has neither image_base64 nor image_name")
    return read_bytes(join_url(root, info["image_name"]))


def _count_documents(url: str) -> int:
    return sum(1 for _ in read_documents(url))
