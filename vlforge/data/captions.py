"""Image-text pairs from caption files, as ALBEF's pretraining and retrieval data come.

A caption file is a JSON list, or JSON lines, of entries::

    {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "a plate of food"}
    {"image": "vg/1.jpg", "caption": ["two men", "men by a bus"]}     # one is drawn per epoch

(``captions`` is accepted for ``caption``.) Image paths are relative to
``image_root`` (default: the caption file's folder) and read through fsspec.
An entry may name its image's identity, ``"image_id": 139``; without one the
image path is its identity. Karpathy's split files (``dataset_coco.json``,
``dataset_flickr30k.json``: ``{"images": [{"filepath", "filename", "imgid",
"split", "sentences": [{"raw"}]}]}``) are read as one entry per image.

Held-out splits group the entries of one image (JSON lines with one caption
each and the same ``image_id``, say) into one item with all its captions:
retrieval matches by image identity, never by caption text.

For streaming, each epoch permutes all entries (seeded) and cuts the
permutation into chunks of ``chunk_size``: the chunks are the units readers
split and resume by, so shuffling is global, as ALBEF's random sampler is.
Every image is its own request: for remote data at scale, pack to shards
(``vlforge data pack``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from vlforge.data.examples import (
    EvalSplit,
    ImageText,
    clean_caption,
    image_text_parts,
    load_image,
)
from vlforge.data.sharded import BadSample, StreamingSource
from vlforge.data.transforms import ImagePipeline, sample_seed
from vlforge.data.urls import expand_urls, join_url, parent_url, read_bytes
from vlforge.errors import UserError

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.data import CaptionsConfig

log = logging.getLogger("vlforge.data")


class Entry(NamedTuple):
    key: str  # "<file stem>/<index in file>"
    image_url: str
    captions: tuple[str, ...]
    # (counter kind, "file:line: what is wrong") of a record that cannot be used: it is kept in
    # its place, so keys and chunks stay the same, and counted as a skipped sample when read.
    problem: tuple[str, str] | None = None
    image_id: str = ""  # the record's image_id; "" when it has none (the image URL is the identity)
    split: str = ""  # Karpathy files: the image's split (train, restval, val, test)


class Chunk(NamedTuple):
    entries: np.ndarray  # indices into the entry list, in reading order


WARNED_LINES = 5  # bad lines warned about one by one per file; the rest are summed up


def read_caption_file(url: str, image_root: str = "") -> list[Entry]:
    """The entries of one JSON or JSONL caption file (``image_root`` default: the file's folder).

    A JSON list is one document: if it cannot be read, nothing of it can (a UserError naming
    the file and where). In JSON lines, each line stands alone: a line that is not UTF-8, not
    JSON, has no ``image`` or no text caption becomes an entry with a ``problem``, warned about
    with the file and its line number and counted as a skipped sample (``skipped_bad_line``,
    ``skipped_bad_entry``) when read.
    """
    import fsspec

    try:
        with fsspec.open(url, "rb", compression="infer") as stream:
            data = stream.read()
    except OSError as exc:
        raise UserError(f"caption file {url}: {type(exc).__name__}: {exc}") from exc
    root = image_root or parent_url(url)
    stem = url.rsplit("/", 1)[-1].split(".", 1)[0]
    if data.lstrip().startswith(b"["):
        records = [(index + 1, record, None) for index, record in enumerate(_json_list(data, url))]
        where = "entry"
    elif (karpathy := _karpathy(data)) is not None:
        return [_karpathy_entry(record, f"{stem}/{index}", root) for index, record in enumerate(karpathy)]
    else:
        records = list(json_lines(data))
        where = "line"
    entries = [
        _entry(record, f"{stem}/{index}", root, f"{url}:{where} {number}", failure)
        for index, (number, record, failure) in enumerate(records)
    ]
    warn_bad_records(url, [entry.problem for entry in entries if entry.problem])
    return entries


def _json_list(data: bytes, url: str) -> list[Any]:
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(
            f"caption file {url}: not UTF-8 (byte 0x{data[exc.start]:02x} at {exc.start})"
        ) from None
    except ValueError as exc:
        raise UserError(f"caption file {url}: not JSON ({exc})") from None
    if not isinstance(records, list):
        raise UserError(f"caption file {url}: a JSON list of entries is needed, got {type(records).__name__}")
    return records


def _karpathy(data: bytes) -> list[dict[str, Any]] | None:
    """The image records of a Karpathy split file (one JSON object with "images"), else None."""
    if b'"images"' not in data[:1000]:
        return None
    try:
        whole = json.loads(data.decode("utf-8"))
    except ValueError:  # JSON lines that mention "images" (UnicodeDecodeError is a ValueError)
        return None
    return whole["images"] if isinstance(whole, dict) and isinstance(whole.get("images"), list) else None


def _karpathy_entry(record: dict[str, Any], key: str, root: str) -> Entry:
    path = "/".join(part for part in (record.get("filepath", ""), record["filename"]) if part)
    captions = tuple(sentence["raw"] for sentence in record.get("sentences", ()))
    image_id = str(record.get("cocoid", record.get("imgid", path)))
    return Entry(key, join_url(root, path), captions, image_id=image_id, split=record.get("split", ""))


def json_lines(data: bytes) -> Iterator[tuple[int, Any, str | None]]:
    """(line number from 1, record, why it could not be read or None) of every non-blank line."""
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8")), None
        except UnicodeDecodeError as exc:
            yield number, None, f"not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
        except ValueError as exc:
            yield number, None, f"not JSON ({exc})"


def _entry(record: Any, key: str, root: str, where: str, failure: str | None) -> Entry:
    """An entry from one record; a record that cannot be used gives an entry with its problem."""
    if failure is not None:
        return Entry(key, "", (), ("bad_line", f"{where}: {failure}"))
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        return Entry(key, "", (), ("bad_entry", f"{where}: no 'image' path (got {str(record)[:80]})"))
    captions = record.get("caption", record.get("captions", ()))
    captions = (captions,) if isinstance(captions, str) else captions
    if not isinstance(captions, list | tuple) or not all(isinstance(text, str) for text in captions):
        return Entry(key, "", (), ("bad_entry", f"{where}: the caption is not text (got {captions!r:.80})"))
    image_id = str(record["image_id"]) if "image_id" in record else ""
    return Entry(key, join_url(root, record["image"]), tuple(captions), image_id=image_id)


def warn_bad_records(url: str, problems: list[tuple[str, str]]) -> None:
    """Log the first ``WARNED_LINES`` skipped records of ``url`` (``(kind, detail)`` pairs), then a count."""
    for _, detail in problems[:WARNED_LINES]:
        log.warning("data: skipping %s", detail)
    if len(problems) > WARNED_LINES:
        log.warning("data: skipping %d more bad records of %s", len(problems) - WARNED_LINES, url)


KARPATHY_SPLITS = {"train", "restval", "val", "test"}


def held_out_images(entries: list[Entry], split: str) -> list[Entry]:
    """One entry per image (by image id, else URL), with every caption of it, first-seen order.

    Entries of a Karpathy file are those of ``split`` when it names one of Karpathy's splits.
    """
    if split in KARPATHY_SPLITS and any(entry.split for entry in entries):
        entries = [entry for entry in entries if entry.split == split]
    images: dict[str, Entry] = {}
    for entry in entries:
        identity = entry.image_id or entry.image_url
        known = images.get(identity)
        images[identity] = (
            entry._replace(image_id=identity)
            if known is None
            else known._replace(captions=known.captions + entry.captions)
        )
    return list(images.values())


class CaptionsSource(StreamingSource):
    """The ``captions`` data source: streaming train entries plus held-out caption files."""

    def __init__(
        self,
        config: CaptionsConfig,
        *,
        train_pipeline: ImagePipeline,
        eval_pipeline: ImagePipeline,
        collate: Any,
    ) -> None:
        self.config = config
        self.bad_data = config.bad_data
        self.entries = [
            entry for url in expand_urls(config.files) for entry in read_caption_file(url, config.image_root)
        ]
        if not self.entries:
            raise UserError(f"data.files: no entries in {config.files}")
        self.train_pipeline, self.eval_pipeline = train_pipeline, eval_pipeline
        self.collate = collate
        self._units: tuple[tuple[int, int], list[Chunk]] | None = None  # (epoch, seed) -> chunks

    @classmethod
    def from_context(cls, config: CaptionsConfig, ctx: BuildContext) -> CaptionsSource:
        return cls(config, **image_text_parts(config, ctx, "captions"))

    # ------------------------------------------------------------------ streaming

    def units(self, epoch: int, seed: int) -> list[Chunk]:
        if self._units is None or self._units[0] != (epoch, seed):
            count, size = len(self.entries), self.config.chunk_size
            order = (
                np.random.default_rng([seed, epoch]).permutation(count)
                if self.config.shuffle
                else np.arange(count)
            )
            self._units = ((epoch, seed), [Chunk(order[i : i + size]) for i in range(0, count, size)])
        return self._units[1]

    def read(self, unit: Chunk, start: int) -> Iterator[tuple[Entry, bytes | None]]:
        for index in unit.entries[start:]:
            entry = self.entries[index]
            yield entry, None if entry.problem else _image_bytes(entry.image_url)

    def decode(
        self, raw: tuple[Entry, bytes | None], seed: int, epoch: int, counts: Counter[str]
    ) -> ImageText:
        entry, image = raw
        if entry.problem is not None:
            raise BadSample(*entry.problem)
        if image is None:
            raise BadSample("unreadable_image", f"{entry.key}: cannot read {entry.image_url}")
        captions = [clean_caption(text, self.config.max_words) for text in entry.captions]
        captions = [caption for caption in captions if caption]
        if not captions:
            raise BadSample("missing_caption", entry.key)
        # ALBEF draws one caption of a multi-caption entry per epoch; here the draw is seeded.
        pick = np.random.default_rng(sample_seed(seed, epoch, entry.key)).integers(len(captions))
        return ImageText(
            entry.key,
            load_image(self.train_pipeline, image, seed=seed, epoch=epoch, key=entry.key),
            captions[pick],
        )

    def num_samples(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------------ held-out splits

    def dataset(self, split: str) -> EvalSplit:
        """A held-out caption file: one item per image with all its captions, eval pipeline."""
        if split not in self.config.splits:
            raise UserError(
                f"captions has no split '{split}' (data.splits: {', '.join(self.config.splits) or 'none'})"
            )
        entries = [
            entry
            for url in expand_urls(self.config.splits[split])
            for entry in read_caption_file(url, self.config.image_root)
        ]
        return EvalSplit(held_out_images(entries, split), functools.partial(self._held_out, split))

    def _held_out(self, split: str, entry: Entry) -> ImageText:
        if entry.problem is not None:  # a held-out split is evaluated whole, or not at all
            raise UserError(f"held-out split '{split}': {entry.problem[1]}")
        image = _image_bytes(entry.image_url)
        if image is None or not entry.captions:
            raise UserError(f"held-out split '{split}': entry {entry.key} has no readable image or caption")
        try:
            pixels = load_image(self.eval_pipeline, image, seed=0, epoch=0, key=entry.key)
        except BadSample as exc:
            raise UserError(f"held-out split '{split}': {exc}") from exc
        captions = tuple(clean_caption(text, self.config.max_words) for text in entry.captions)
        return ImageText(entry.key, pixels, captions[0], image_id=entry.image_id, captions=captions)


def _image_bytes(url: str) -> bytes | None:
    try:
        return read_bytes(url)
    except OSError:  # a missing or unreachable image is a skipped sample, counted by decode
        return None
