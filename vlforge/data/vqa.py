"""Visual question answering files: held-out questions, each with its annotators' answers.

A split is JSON lines, one question a line::

    {"image": "val2014/COCO_val2014_000000000042.jpg", "question": "What is on the plate?",
     "answers": ["pizza", "pizza", "food", ...], "question_id": 42000, "image_id": 42}

``answers`` holds every annotator's answer (VQAv2: 10, repeats kept: the soft score counts
them); ``question_id`` and ``image_id`` are optional. A line that is not JSON, or has no
``image``, ``question`` or ``answers`` list of text, is skipped: warned about with the file
and line number and counted (``VQASource.skipped(split)``), as caption files are read.

A split may instead name the official VQAv2 pair, ``[questions JSON, annotations JSON]``
(``v2_OpenEnded_mscoco_val2014_questions.json``, ``v2_mscoco_val2014_annotations.json``):
questions and answers are joined by ``question_id``, and each image is
``<data_subtype>/COCO_<data_subtype>_<image_id:012d>.jpg`` under ``image_root`` (COCO's layout).

Image paths are relative to ``image_root`` (default: the file's folder) and read through
fsspec; images get the vision encoder's eval transform. A split is evaluated whole: an image
that cannot be read is an error, not a skip.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from vlforge.data.captions import json_lines, warn_bad_records
from vlforge.data.examples import EvalSplit, data_config_of, load_image
from vlforge.data.sharded import BadSample
from vlforge.data.transforms import ImagePipeline
from vlforge.data.urls import expand_urls, join_url, parent_url, read_bytes
from vlforge.errors import UserError

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.data import VQAConfig


class Question(NamedTuple):
    key: str  # the question id, else "<file stem>/<line index>"
    image_url: str
    question: str
    answers: tuple[str, ...]
    image_id: str = ""


@dataclass
class VQAItem:
    key: str
    image: torch.Tensor  # (3, H, W) float32, normalised
    question: str
    answers: tuple[str, ...]  # every annotator's answer
    image_id: str = ""


def _read_json(url: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(url, "rb", compression="infer") as stream:
            return stream.read()
    except OSError as exc:
        raise UserError(f"VQA file {url}: {type(exc).__name__}: {exc}") from exc


def read_vqa_jsonl(url: str, image_root: str = "") -> tuple[list[Question], int]:
    """(questions, bad lines skipped) of one JSONL file; bad lines are warned about by number."""
    root, stem = image_root or parent_url(url), url.rsplit("/", 1)[-1].split(".", 1)[0]
    questions, problems = [], []
    for index, (number, record, failure) in enumerate(json_lines(_read_json(url))):
        problem = failure or _record_problem(record)
        if problem:
            problems.append(("bad_line", f"{url}:line {number}: {problem}"))
            continue
        key = str(record.get("question_id", f"{stem}/{index}"))
        image_id = str(record["image_id"]) if "image_id" in record else ""
        image = join_url(root, record["image"])
        questions.append(Question(key, image, record["question"], tuple(record["answers"]), image_id))
    warn_bad_records(url, problems)
    return questions, len(problems)


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"not a JSON object (got {str(record)[:80]})"
    for field in ("image", "question"):
        if not isinstance(record.get(field), str):
            return f"no '{field}' text (got {str(record)[:80]})"
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return f"'answers' is not a list of text (got {answers!r:.80})"
    return None


def read_official_pair(first_url: str, second_url: str, image_root: str) -> list[Question]:
    """The official VQAv2 questions and annotations files (in either order), joined by question id."""
    try:
        questions, annotations = (json.loads(_read_json(url)) for url in (first_url, second_url))
        if "questions" not in questions:
            questions, annotations = annotations, questions
        subtype = questions["data_subtype"]
        answers = {
            ann["question_id"]: tuple(a["answer"] for a in ann["answers"])
            for ann in annotations["annotations"]
        }
        root = image_root or parent_url(first_url)
        return [
            Question(
                str(q["question_id"]),
                join_url(root, f"{subtype}/COCO_{subtype}_{q['image_id']:012d}.jpg"),
                q["question"],
                answers[q["question_id"]],
                str(q["image_id"]),
            )
            for q in questions["questions"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"VQA files {first_url} + {second_url}: not the official VQAv2 questions and "
            f"annotations pair ({type(exc).__name__}: {exc})"
        ) from None


class VQASource:
    """The ``vqa`` data source: held-out question splits for evaluators (no training stream)."""

    def __init__(self, config: VQAConfig, *, pipeline: ImagePipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self._splits: dict[str, tuple[list[Question], int]] = {}
        for split, spec in config.splits.items():  # a missing file fails here, before any training
            for url in expand_urls(spec):
                if "://" not in url and not Path(url).is_file():
                    raise UserError(f"data.splits.{split}: no VQA file '{url}'")

    @classmethod
    def from_context(cls, config: VQAConfig, ctx: BuildContext) -> VQASource:
        return cls(config, pipeline=ImagePipeline(config.image, data_config_of(ctx, "vqa"), train=False))

    def _questions(self, split: str) -> tuple[list[Question], int]:
        if split not in self.config.splits:
            raise UserError(
                f"vqa has no split '{split}' (data.splits: {', '.join(self.config.splits) or 'none'})"
            )
        if split not in self._splits:
            urls, root = expand_urls(self.config.splits[split]), self.config.image_root
            if len(urls) == 2 and all(url.endswith(".json") for url in urls):
                self._splits[split] = (read_official_pair(*urls, root), 0)
            else:
                parts = [read_vqa_jsonl(url, root) for url in urls]
                self._splits[split] = ([q for qs, _ in parts for q in qs], sum(n for _, n in parts))
        return self._splits[split]

    def dataset(self, split: str) -> EvalSplit:
        return EvalSplit(self._questions(split)[0], functools.partial(self._decode, split))

    def skipped(self, split: str) -> int:
        """Bad lines of ``split``'s files that were skipped."""
        return self._questions(split)[1]

    def collate(self, items: list[VQAItem]) -> dict[str, Any]:
        return {
            "images": torch.stack([item.image for item in items]),  # (B,3,H,W)
            "questions": [item.question for item in items],
            "answers": [list(item.answers) for item in items],
            "keys": [item.key for item in items],
        }

    def _decode(self, split: str, question: Question) -> VQAItem:
        try:
            image = load_image(
                self.pipeline, read_bytes(question.image_url), seed=0, epoch=0, key=question.key
            )
        except (BadSample, OSError) as exc:
            raise UserError(f"VQA split '{split}': cannot read {question.image_url} ({exc})") from exc
        return VQAItem(question.key, image, question.question, question.answers, question.image_id)
