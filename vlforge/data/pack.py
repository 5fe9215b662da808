"""`vlforge data pack` and `vlforge data inspect`.

``pack`` writes WebDataset shards in img2dataset's layout (``key.<image
ext>``, ``key.txt``, ``key.json``) plus ``sizes.json`` (samples per shard,
which the ``webdataset`` source reads for its epoch length), from either

* a folder of images with a same-named ``.txt`` caption beside each one, or
* a caption file (JSON/JSONL of {image, caption(s)}, as the ``captions`` source reads).

Images are stored as they are (no re-encoding). An entry of several captions
keeps the first in ``.txt`` and all of them in ``.json``. Samples are shuffled
before they are cut into shards (seeded; ``pack.json`` records the seed), so
each shard holds a fair share of every class of a sorted folder; ``shuffle=False``
keeps the sorted order. What cannot be packed (no caption, a caption file that is
not UTF-8, a bad caption-file line, an unreadable image) is left out and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlforge.data.captions import read_caption_file
from vlforge.data.sharded import SIZES_FILE
from vlforge.data.tar import KEY_FIELD, BadShard, TarWriter, read_samples
from vlforge.data.urls import expand_urls, read_bytes
from vlforge.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_FILE_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
MANIFEST_FILE = "pack.json"  # how the shards were made: source, order, seed, what was left out

log = logging.getLogger("vlforge.data")


@dataclass
class PackItem:
    source: str  # where the image came from (kept in key.json)
    image_url: str
    captions: tuple[str, ...]
    problem: tuple[str, str] | None = None  # (counter kind, detail) of an item that cannot be packed


@dataclass
class PackReport:
    shards: dict[str, int] = field(default_factory=dict)  # shard file name -> samples
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def samples(self) -> int:
        return sum(self.shards.values())


def pack_items(src: str, image_root: str = "") -> list[PackItem]:
    """What ``src`` holds: a caption file's entries, or a folder's images with their .txt captions."""
    if src.endswith(CAPTION_FILE_SUFFIXES):
        return [
            PackItem(entry.key, entry.image_url, entry.captions, entry.problem)
            for entry in read_caption_file(src, image_root)
        ]
    folder = Path(src)
    if not folder.is_dir():
        raise UserError(
            f"{src}: neither a folder of images nor a caption file ({', '.join(CAPTION_FILE_SUFFIXES)})"
        )
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [_folder_item(folder, image) for image in images]


def _folder_item(folder: Path, image: Path) -> PackItem:
    """An image of a folder with the caption of the same-named .txt (UTF-8) beside it."""
    source, caption_file = str(image.relative_to(folder)), image.with_suffix(".txt")
    if not caption_file.is_file():
        return PackItem(source, str(image), ())
    data = caption_file.read_bytes()
    try:
        return PackItem(source, str(image), (data.decode("utf-8").strip(),))
    except UnicodeDecodeError as exc:
        detail = f"{caption_file}: not UTF-8 (byte 0x{data[exc.start]:02x} at {exc.start}); save it as UTF-8"
        log.warning("data: skipping %s", detail)
        return PackItem(source, str(image), (), ("caption_not_utf8", detail))


def pack(
    src: str,
    dest: str,
    *,
    shard_size: int = 1000,
    image_root: str = "",
    shuffle: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> PackReport:
    """Write ``src`` as shards ``dest/00000.tar``... and ``dest/sizes.json``; returns what was written.

    ``shuffle``: the samples' order is a permutation seeded by ``seed`` (recorded in
    ``dest/pack.json``), else the sorted order of ``src``.
    """
    import fsspec
    import numpy as np
    from tqdm.auto import tqdm

    fs, root = fsspec.core.url_to_fs(dest)
    _check_destination(fs, root, dest)
    items = pack_items(src, image_root)
    if not items:
        raise UserError(f"{src}: nothing to pack")
    if shuffle:
        items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    fs.makedirs(root, exist_ok=True)
    report = PackReport()
    digits = len(str(shard_size - 1))
    bar = tqdm(total=len(items), unit="sample", desc=f"packing {src}", disable=not progress)
    for shard_index, batch in enumerate(_samples(items, shard_size, report.skipped, bar)):
        name = f"{shard_index:05d}.tar"
        with fs.open(f"{root}/{name}", "wb") as stream:
            writer = TarWriter(stream)
            for index, sample in enumerate(batch):
                writer.write({**sample, KEY_FIELD: f"{shard_index:05d}{index:0{digits}d}"})
            writer.close()
        report.shards[name] = writer.count
    bar.close()
    with fs.open(f"{root}/{SIZES_FILE}", "w") as stream:
        json.dump(report.shards, stream, indent=1)
    manifest = {
        "source": src,
        "shuffle": shuffle,
        "seed": seed if shuffle else None,
        "samples": report.samples,
        "skipped": dict(sorted(report.skipped.items())),
    }
    with fs.open(f"{root}/{MANIFEST_FILE}", "w") as stream:
        json.dump(manifest, stream, indent=1)
    return report


def _check_destination(fs: Any, root: str, dest: str) -> None:
    """DEST must be a new or empty folder: packing never overwrites a file or earlier shards."""
    if fs.isfile(root):
        raise UserError(f"DEST {dest} is a file; give a folder (new or empty) for the shards")
    if fs.isdir(root) and fs.ls(root, detail=False):
        raise UserError(f"DEST {dest} is not empty; give a new or empty folder for the shards")


def _samples(
    items: list[PackItem], shard_size: int, skipped: Counter[str], bar: Any
) -> Iterator[list[dict[str, Any]]]:
    """Shard-sized lists of samples; items without a readable image or a caption are counted and left out."""
    batch: list[dict[str, Any]] = []
    for item in items:
        bar.update(1)
        if item.problem is not None:
            skipped[item.problem[0]] += 1
            continue
        captions = [caption.strip() for caption in item.captions if caption.strip()]
        if not captions:
            skipped["missing_caption"] += 1
            continue
        try:
            image = read_bytes(item.image_url)
        except OSError:
            skipped["unreadable_image"] += 1
            continue
        extension = item.image_url.rsplit(".", 1)[-1].lower()
        batch.append(
            {
                extension if f".{extension}" in IMAGE_SUFFIXES else "jpg": image,
                "txt": captions[0],
                "json": json.dumps({"source": item.source, "captions": captions}),
            }
        )
        if len(batch) == shard_size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- inspect


@dataclass
class ShardSummary:
    url: str
    samples: int
    fields: Counter[str]
    error: str | None  # how reading broke off, if it did


def inspect_shards(
    spec: str, *, show: int = 3, max_shards: int | None = None
) -> tuple[list[ShardSummary], list[dict]]:
    """Per-shard sample counts (reading each shard through) and the first ``show`` samples."""
    summaries, examples = [], []
    for url in expand_urls(spec)[:max_shards]:
        fields: Counter[str] = Counter()
        count, error = 0, None
        try:
            for sample in read_samples(url):
                count += 1
                fields.update(name for name in sample if not name.startswith("__"))
                if len(examples) < show:
                    examples.append(sample)
        except BadShard as exc:
            error = f"{exc.kind}: {exc}"
        summaries.append(ShardSummary(url, count, fields, error))
    return summaries, examples


def describe_sample(sample: dict[str, Any]) -> str:
    """One sample as text: key, fields with sizes, caption, image size."""
    lines = [f"{sample[KEY_FIELD]}  ({sample.get('__url__', '')})"]
    for name, value in sorted(sample.items()):
        if name.startswith("__"):
            continue
        if name in ("txt", "json"):
            text = value.decode("utf-8", "replace")
            lines.append(f"  {name}: {text[:200]}")
        else:
            lines.append(f"  {name}: {len(value)} bytes{_image_size(value)}")
    return "\n".join(lines)


def _image_size(data: bytes) -> str:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return f", {image.format} {image.width}x{image.height}"
    except (UnidentifiedImageError, OSError):
        return ", not a readable image"


# --------------------------------------------------------------------------- demo data


def write_shapes_folder(
    folder: str | Path, count: int, *, image_size: int = 64, seed: int = 0, noise: float = 0.05
) -> list[Path]:
    """Write ``count`` generated shapes (``synthetic.shapes`` train items) as JPEG + .txt caption files.

    A dataset in the on-disk form ``pack`` reads, for demos, tests and benchmarks.
    """
    from PIL import Image

    from vlforge.data.synthetic import ShapesDataset

    shapes = ShapesDataset(seed=seed, split="train", length=count, image_size=image_size, noise=noise)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        item = shapes[index]
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(item["image"]).save(path, format="JPEG", quality=90)
        path.with_suffix(".txt").write_text(item["caption"], encoding="utf-8")
        paths.append(path)
    return paths
