"""Labelled images in an ImageFolder layout: ``<split folder>/<class name>/<image>``.

torchvision's layout, as ImageNet's validation set is usually unpacked: class
``i`` is the ``i``-th class folder in sorted order (so labels agree with
``torchvision.datasets.ImageFolder``), and its folder name is its class name
unless the evaluator names classes itself (the 1,000 ImageNet names, say,
where the folders are WordNet ids). Images are decoded with the eval
pipeline (resize, centre crop, normalise) of the vision encoder. Folders are
listed through fsspec, so a split may live on an object store.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from vlforge.data.examples import EvalSplit, ImageText, PairCollate, data_config_of, load_image
from vlforge.data.sharded import BadSample
from vlforge.data.transforms import ImagePipeline
from vlforge.data.urls import read_bytes
from vlforge.errors import UserError

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.data import ImageFolderConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_image_folder(url: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names in label order, [(image url, label)] in sorted order) of one split folder."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise UserError(f"image folder {url}: not a folder")
    classes = sorted(
        entry["name"].rstrip("/").rsplit("/", 1)[-1]
        for entry in fs.ls(root, detail=True)
        if entry["type"] == "directory"
    )
    if not classes:
        raise UserError(f"image folder {url}: no class folders (expected <split>/<class>/<image>)")
    images = [
        (fs.unstrip_protocol(path), label)
        for label, name in enumerate(classes)
        for path in sorted(fs.find(f"{root}/{name}"))
        if path.lower().endswith(IMAGE_SUFFIXES)
    ]
    return classes, images


class ImageFolderSource:
    """The ``imagefolder`` data source (``DataSourceLike``): labelled splits, label name ``class``."""

    def __init__(self, config: ImageFolderConfig, *, pipeline: ImagePipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.collate = PairCollate(None)  # images and labels; class images have no captions
        self._listings: dict[str, tuple[list[str], list[tuple[str, int]]]] = {}

    @classmethod
    def from_context(cls, config: ImageFolderConfig, ctx: BuildContext) -> ImageFolderSource:
        return cls(
            config, pipeline=ImagePipeline(config.image, data_config_of(ctx, "imagefolder"), train=False)
        )

    def _listing(self, split: str) -> tuple[list[str], list[tuple[str, int]]]:
        if split not in self.config.splits:
            raise UserError(
                f"imagefolder has no split '{split}' (data.splits: {', '.join(self.config.splits) or 'none'})"
            )
        if split not in self._listings:
            self._listings[split] = list_image_folder(self.config.splits[split])
        return self._listings[split]

    def dataset(self, split: str) -> EvalSplit:
        return EvalSplit(self._listing(split)[1], functools.partial(self._decode, split))

    def class_names(self, attribute: str, split: str) -> list[str]:
        """The class folder names of ``split``, in label order."""
        return self._listing(split)[0]

    def _decode(self, split: str, item: tuple[str, int]) -> ImageText:
        url, label = item
        try:
            image = load_image(self.pipeline, read_bytes(url), seed=0, epoch=0, key=url)
        except (BadSample, OSError) as exc:
            raise UserError(f"imagefolder split '{split}': cannot read {url} ({exc})") from exc
        return ImageText(url, image, "", labels={"class": label})
