"""Flamingo's sequences: formats, label masking, batches, and generated pairs and documents.

Formats (methods.md §4.3):

* pair: ``<image>{caption}<|endofchunk|>{eos}``; labels drop padding and
  ``<image>`` (``<|endofchunk|>`` and eos are predicted);
* interleaved document: text chunks and images, each image followed by the
  text tied to it and ``<|endofchunk|>``; labels additionally drop every
  token before the first ``<image>`` and every token after an
  ``<|endofchunk|>`` up to the next ``<image>`` (text tied to no image).

``FlamingoCollator`` turns examples into batches: already formatted ones
(``FlamingoExample``, the generated data) and the core readers' examples
(``ImageText`` from ``webdataset``/``captions``, ``InterleavedDocument``
from ``interleaved``), named in a recipe as ``collate =
"vlforge_plugins.flamingo.data:make_pair_collate"`` /
``"...:make_document_collate"``.

The generated data (``flamingo.shapes``) reuses the ``synthetic.shapes``
images: a pair is one shapes item; a document holds 1..max_images of them,
each followed by its caption or by a question and answer about one of its
attributes, with untied sentences before the first image and between chunks.

Several datasets per run: the core ``mix`` source with ``mode = "cycle"``
(each micro-batch whole from one dataset, named in ``batch["dataset"]``)
and ``train.accum_steps`` a multiple of the number of datasets; the loss
weights are the objective's (``flamingo.lm`` ``dataset_weights``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from vlforge_plugins.flamingo.lm import END_OF_CHUNK, IMAGE_TOKEN

from vlforge.data.examples import ImageText
from vlforge.data.interleaved import InterleavedDocument, stack_images
from vlforge.data.synthetic import ATTRIBUTES, SPLITS, VOCABULARY, ShapesDataset

if TYPE_CHECKING:
    from vlforge_plugins.flamingo import ShapesDataConfig

    from vlforge.components import BuildContext

IGNORE = -100  # label of a position that is not trained
PAIR_MAX_TOKENS = 32  # OpenFlamingo's LAION sequences
DOCUMENT_MAX_TOKENS = 256  # OpenFlamingo's MMC4 sequences

QUESTIONS = {
    "color": "what color is the shape ?",
    "shape": "what shape is it ?",
    "size": "what size is the shape ?",
    "position": "where is the shape ?",
}
QA_TEMPLATE = "question : {question} answer : {answer}"
INTRO_SENTENCES = ("here are some pictures", "this page shows a few shapes", "look at these images")
BETWEEN_SENTENCES = ("and here is another one", "the next picture follows", "now something else")


# --------------------------------------------------------------------------- tokenizer


def _pieces(text: str) -> list[str]:
    """Words and punctuation as the word-level tokenizer's pre-tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]+", re.sub(r"\{\w+\}", " ", text))


# Every word the generated Flamingo data and its few-shot prompts use.
WORDS = sorted(
    set(VOCABULARY)
    | {
        piece
        for text in (*QUESTIONS.values(), QA_TEMPLATE, *INTRO_SENTENCES, *BETWEEN_SENTENCES)
        for piece in _pieces(text)
    }
)


def shapes_tokenizer() -> Any:
    """``flamingo:shapes``: a word-level tokenizer over ``WORDS`` that adds [CLS] as BOS only.

    (The core word-level tokenizer wraps texts as [CLS] text [SEP]; a causal LM
    needs an open end, so [SEP] becomes the eos token, appended explicitly.)
    """
    from tokenizers import processors

    from vlforge.data.tokenizers import word_level_tokenizer

    tokenizer = word_level_tokenizer(WORDS)
    bos = tokenizer.cls_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.cls_token_id)]
    )
    tokenizer.add_special_tokens({"bos_token": bos, "eos_token": tokenizer.sep_token})
    return tokenizer


# --------------------------------------------------------------------------- formats and labels


def pair_text(caption: str, eos: str) -> str:
    return f"{IMAGE_TOKEN}{caption}{END_OF_CHUNK}{eos}"


def document_text(sentences: list[str], image_sentence: list[int], eos: str) -> str:
    """MMC4 layout: ``<|endofchunk|><image>`` before each image's sentence, the first
    ``<|endofchunk|>`` dropped, no spaces around the special tokens, ``<|endofchunk|>{eos}`` last."""
    pieces = []
    for index, sentence in enumerate(sentences):
        pieces += [END_OF_CHUNK + IMAGE_TOKEN] * image_sentence.count(index)
        pieces.append(sentence)
    text = " ".join(pieces).replace(END_OF_CHUNK, "", 1)
    text = re.sub(rf"\s*({re.escape(IMAGE_TOKEN)}|{re.escape(END_OF_CHUNK)})\s*", r"\1", text)
    return f"{text}{END_OF_CHUNK}{eos}"


def qa_text(attribute: str, answer: str) -> str:
    return QA_TEMPLATE.format(question=QUESTIONS[attribute], answer=answer)


def pair_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_id: int) -> torch.Tensor:
    """(B,L) -> (B,L) labels: padding and ``<image>`` ignored."""
    return input_ids.masked_fill((attention_mask == 0) | (input_ids == image_id), IGNORE)


def interleaved_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_id: int, end_of_chunk_id: int
) -> torch.Tensor:
    """(B,L) -> (B,L) labels: as pairs, plus text tied to no image ignored.

    A position is untied if no ``<image>`` comes at or before it, or if the
    last ``<|endofchunk|>`` strictly before it comes after the last ``<image>``.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    none = torch.full_like(positions, -1)
    last_image = torch.where(input_ids == image_id, positions, none).cummax(dim=1).values  # (B,L)
    last_end = torch.where(input_ids == end_of_chunk_id, positions, none).cummax(dim=1).values
    last_end_before = torch.cat([none[:, :1], last_end[:, :-1]], dim=1)  # strictly before each position
    untied = (last_image < 0) | (last_end_before > last_image)
    return pair_labels(input_ids, attention_mask, image_id).masked_fill(untied, IGNORE)


# --------------------------------------------------------------------------- batches


@dataclass
class FlamingoExample:
    text: str  # formatted, with <image> placeholders
    images: list[torch.Tensor]  # each (3,H,W) normalised, in placeholder order


def normalize_images(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float, normalised with (3,) mean and std."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def tokenize_padded(
    tokenizer: Any, texts: list[str], max_length: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Texts -> ``input_ids``/``attention_mask`` (B,L), cut at max_length, padded on ``side``."""
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


class FlamingoCollator:
    """Examples -> a training batch (picklable: it runs in DataLoader workers).

    ``images`` (B,T,3,H,W), T = most images in the batch, unused slots zero;
    ``input_ids``/``attention_mask``/``labels`` (B,L), right-padded, cut at
    ``max_length`` (images whose ``<image>`` was cut off are never attended).
    """

    def __init__(self, tokenizer: Any, *, max_length: int, interleaved: bool) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.interleaved = interleaved
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_of_chunk_id = tokenizer.convert_tokens_to_ids(END_OF_CHUNK)

    def example(self, item: Any) -> FlamingoExample:
        """A core reader's example in Flamingo's format."""
        eos = self.tokenizer.eos_token
        if isinstance(item, ImageText):
            return FlamingoExample(pair_text(item.caption, eos), [item.image])
        if isinstance(item, InterleavedDocument):
            return FlamingoExample(document_text(item.sentences, item.image_sentence, eos), item.images)
        return item

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        examples = [self.example(item) for item in items]
        tokens = tokenize_padded(self.tokenizer, [example.text for example in examples], self.max_length)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if self.interleaved:
            labels = interleaved_labels(ids, mask, self.image_id, self.end_of_chunk_id)
        else:
            labels = pair_labels(ids, mask, self.image_id)
        images, _ = stack_images(examples)  # (B,T,3,H,W)
        return {"images": images, "input_ids": ids, "attention_mask": mask, "labels": labels}


def _fusion_tokenizer(ctx: BuildContext) -> Any:
    fusion = ctx.parts.get("fusion")
    if not hasattr(fusion, "tokenizer"):
        raise ValueError(
            "Flamingo's collate needs [model.fusion] (type = 'flamingo.gated_xattn') for its tokenizer"
        )
    return fusion.tokenizer


def make_pair_collate(ctx: BuildContext) -> FlamingoCollator:
    """``collate`` for pair sources (``webdataset``, ``captions``): LAION-style, 32 tokens."""
    return FlamingoCollator(_fusion_tokenizer(ctx), max_length=PAIR_MAX_TOKENS, interleaved=False)


def make_document_collate(ctx: BuildContext) -> FlamingoCollator:
    """``collate`` for the ``interleaved`` source: MMC4-style, 256 tokens."""
    return FlamingoCollator(_fusion_tokenizer(ctx), max_length=DOCUMENT_MAX_TOKENS, interleaved=True)


def planned_sequences(data: Any, micro_batch: int) -> dict[str, tuple[int, int, int]]:
    """``{dataset: (sequences, images, tokens)}``: the largest micro-batch each source of ``data`` makes.

    ``data`` is the recipe's ``[data]`` table (a ``mix`` of sources, or one source); a source's
    own ``micro_batch`` wins over the run's. Document sources (``interleaved`` and generated
    documents) hold up to ``max_images``, pairs one image.
    """
    if data.type == "mix":
        tables = {name: (table.type, table.model_extra or {}) for name, table in data.config.sources.items()}
    else:
        tables = {"train": (data.type, data.options)}
    planned = {}
    for name, (kind, options) in tables.items():
        samples = options.get("micro_batch") or micro_batch
        if kind == "flamingo.shapes":
            images = options.get("max_images", 3) if options.get("kind") == "interleaved" else 1
            planned[name] = (samples, images, options.get("max_length", 64))
        elif kind == "interleaved":
            planned[name] = (samples, options.get("max_images", 6), DOCUMENT_MAX_TOKENS)
        else:  # image-text pairs (webdataset, captions) through make_pair_collate
            planned[name] = (samples, 1, PAIR_MAX_TOKENS)
    return planned


# --------------------------------------------------------------------------- generated data


class ShapesPairs(Dataset):
    """Item i: one shapes image and ``<image>{caption}<|endofchunk|>{eos}``."""

    def __init__(self, shapes: ShapesDataset, eos: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.shapes = shapes
        self.eos = eos
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> FlamingoExample:
        item = self.shapes[index]
        image = normalize_images(item["image"][None], self.mean, self.std)[0]
        return FlamingoExample(pair_text(item["caption"], self.eos), [image])


class ShapesDocuments(ShapesPairs):
    """Item i: 1..max_images shapes images, each tied to its caption or a question-answer.

    Images of document i are shapes items i·max_images + j; the document's
    layout is drawn from its own generator, seeded with (seed, split, i).
    """

    def __init__(
        self,
        shapes: ShapesDataset,
        eos: str,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        max_images: int,
        qa_fraction: float,
    ) -> None:
        super().__init__(shapes, eos, mean, std)
        self.max_images = max_images
        self.qa_fraction = qa_fraction

    def __len__(self) -> int:
        return len(self.shapes) // self.max_images

    def __getitem__(self, index: int) -> FlamingoExample:
        rng = np.random.default_rng([self.shapes.seed, SPLITS.index(self.shapes.split), index, 1])
        count = int(rng.integers(1, self.max_images + 1))
        items = [self.shapes[index * self.max_images + j] for j in range(count)]
        text = INTRO_SENTENCES[rng.integers(len(INTRO_SENTENCES))] if rng.random() < 0.5 else ""
        for j, item in enumerate(items):
            if j and rng.random() < 0.5:
                text += BETWEEN_SENTENCES[rng.integers(len(BETWEEN_SENTENCES))]
            text += f"{IMAGE_TOKEN}{self._tied_text(item, rng)}{END_OF_CHUNK}"
        images = normalize_images(np.stack([item["image"] for item in items]), self.mean, self.std)
        return FlamingoExample(text + self.eos, list(images))

    def _tied_text(self, item: dict[str, Any], rng: np.random.Generator) -> str:
        if rng.random() >= self.qa_fraction:
            return item["caption"]
        attribute = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
        return qa_text(attribute, ATTRIBUTES[attribute][item["labels"][attribute]])


class ShapesSource:
    """The ``flamingo.shapes`` data source: generated pairs or interleaved documents, any split."""

    def __init__(
        self, config: ShapesDataConfig, tokenizer: Any, *, image_size: int, mean: Any, std: Any
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.collate = FlamingoCollator(
            tokenizer, max_length=config.max_length, interleaved=config.kind == "interleaved"
        )

    def dataset(self, split: str) -> Dataset:
        config, eos = self.config, self.tokenizer.eos_token
        images_per_item = 1 if config.kind == "pairs" else config.max_images
        shapes = ShapesDataset(
            seed=config.seed,
            split=split,
            length=config.size * images_per_item,
            image_size=self.image_size,
            noise=config.background_noise,
        )
        if config.kind == "pairs":
            return ShapesPairs(shapes, eos, self.mean, self.std)
        return ShapesDocuments(
            shapes, eos, self.mean, self.std, max_images=config.max_images, qa_fraction=config.qa_fraction
        )
