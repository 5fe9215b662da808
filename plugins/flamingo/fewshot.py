"""``flamingo.fewshot``: k-shot captioning and VQA on generated shapes or on real data (COCO, VQAv2).

Prompts follow OpenFlamingo's layout in the words of the generated data:
k in-context examples, each ``<image>{text}<|endofchunk|>``, then the query
image and its prefix; the answer is generated greedily with cached media
until ``<|endofchunk|>`` or eos. Examples come from the train split (drawn
per query from a seeded generator), queries from a held-out split. With
k = 0 the prompt holds two text-only examples (no image), as in Flamingo.

* caption: the example text is the canonical caption (the held-out
  captions' template); reports CIDEr-D (×100, the paper's scale) and exact match.
* vqa: ``question : what color is the shape ? answer : red``; reports
  exact-match accuracy and chance (1 / number of answers).

With ``source = "data"`` queries and examples come from the evaluator's data
instead, the query split's first ``num_queries`` items and, for the examples,
``support_split``; images then get the vision encoder's eval transform.

* caption: a held-out caption file (COCO's Karpathy test split, say); each
  image is scored by CIDEr-D against all its captions, and each example is
  shown with its first caption.
* vqa: a ``vqa`` split (VQAv2); OpenFlamingo's prompt ``<image>Question:{q}
  Short answer:{a}<|endofchunk|>``, each example with its most frequent answer.
  The generation is cut as OpenFlamingo cuts it (``vqa_answer_of``) and scored
  by the official VQAv2 soft accuracy against all its answers, ×100;
  ``skipped_lines`` counts the query files' bad lines left out.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vlforge_plugins.flamingo.data import QA_TEMPLATE, QUESTIONS, normalize_images, tokenize_padded
from vlforge_plugins.flamingo.generate import greedy_generate
from vlforge_plugins.flamingo.lm import END_OF_CHUNK, IMAGE_TOKEN
from vlforge_plugins.flamingo.metrics import cider_d, normalize_answer, vqa_accuracy, vqa_answer_of

from vlforge.data.synthetic import ATTRIBUTES, CAPTION_TEMPLATES, ShapesDataset
from vlforge.eval.shards import eval_mode, gather_list, my_batches

if TYPE_CHECKING:
    from vlforge_plugins.flamingo import FewShotConfig

    from vlforge.components import BuildContext

SUPPORT_SIZE = 10_000  # train items the in-context examples are drawn from
ZERO_SHOT_TEXT_EXAMPLES = 2
MAX_PROMPT_TOKENS = 1024
VQA_PROMPT = "Question:{question} Short answer:"  # OpenFlamingo's, for real questions


def canonical_caption(item: dict[str, Any]) -> str:
    return CAPTION_TEMPLATES[0].format(**{name: ATTRIBUTES[name][i] for name, i in item["labels"].items()})


class ShapesItems:
    """Generated queries or examples: items are dicts with an (H,W,3) uint8 ``image`` and ``labels``."""

    def __init__(self, dataset: ShapesDataset, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.dataset, self.mean, self.std = dataset, mean, std

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def pixels(self, item: dict[str, Any]) -> torch.Tensor:
        return normalize_images(item["image"][None], self.mean, self.std)[0]  # (3,H,W)


class DataItems:
    """Queries or examples from a data source's held-out split: ``ImageText`` items with captions,
    or ``VQAItem``s (a question and its answers)."""

    def __init__(self, dataset: Any, limit: int | None = None) -> None:
        self.dataset, self.length = dataset, min(len(dataset), limit or len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def pixels(self, item: Any) -> torch.Tensor:
        return item.image  # (3,H,W), already normalised by the source's eval pipeline


class FewShotEvaluator:
    """Greedy k-shot generation over ``num_queries`` held-out images for each k in ``shots``.

    Every rank generates for its share of the query batches; predictions are gathered in
    order and scored whole, so every rank returns the one-process metrics.
    """

    def __init__(self, config: FewShotConfig) -> None:
        self.config = config
        self.max_new_tokens = config.max_new_tokens or (20 if config.task == "caption" else 5)

    # ------------------------------------------------------------------ prompts

    @property
    def real_questions(self) -> bool:
        return self.config.source == "data" and self.config.task == "vqa"

    def answer(self, item: Any) -> str:
        """The text an in-context example shows after its prefix."""
        if self.real_questions:
            return Counter(item.answers).most_common(1)[0][0]  # ties: the first given
        if self.config.source == "data":
            return item.captions[0] if item.captions else item.caption
        if self.config.task == "caption":
            return canonical_caption(item)
        attribute = self.config.attribute
        return ATTRIBUTES[attribute][item["labels"][attribute]]

    def references(self, item: Any) -> list[str]:
        """What a prediction for ``item`` is scored against: every caption or answer of a data item."""
        if self.real_questions:
            return list(item.answers)
        return list(item.captions or (item.caption,)) if self.config.source == "data" else [self.answer(item)]

    def prefix(self, item: Any) -> str:
        """What follows an item's ``<image>`` before its answer (generated for the query)."""
        if self.config.task == "caption":
            return ""
        if self.real_questions:
            return VQA_PROMPT.format(question=item.question.strip())
        return QA_TEMPLATE.format(question=QUESTIONS[self.config.attribute], answer="")

    def example(self, item: Any, with_image: bool = True) -> str:
        text = f"{self.prefix(item)}{self.answer(item)}"
        return f"{IMAGE_TOKEN if with_image else ''}{text}{END_OF_CHUNK}"

    def prompt(self, query: Any, examples: list[Any], shots: int, items: Any) -> tuple[str, torch.Tensor]:
        """(text, (images, 3, H, W)) of one prompt: the examples' images, then the query's."""
        with_images = shots > 0
        text = "".join(self.example(item, with_images) for item in examples)
        images = [items.pixels(item) for item in examples] if with_images else []
        return f"{text}{IMAGE_TOKEN}{self.prefix(query)}", torch.stack([*images, items.pixels(query)])

    def examples_for(self, index: int, shots: int, support: Any) -> list[Any]:
        count = shots or ZERO_SHOT_TEXT_EXAMPLES
        rng = np.random.default_rng([self.config.seed, index, shots])
        return [support[int(i)] for i in rng.choice(len(support), size=count, replace=False)]

    # ------------------------------------------------------------------ evaluation

    def sources(self, model: Any, ctx: BuildContext) -> tuple[Any, Any]:
        """(support, queries): generated shapes, or the evaluator's data splits."""
        config = self.config
        if config.source == "data":
            data = ctx.parts["data"]
            return DataItems(data.dataset(config.support_split)), DataItems(
                data.dataset(config.split), config.num_queries
            )
        data_config = model.vision.data_config
        mean = torch.tensor(data_config["mean"], dtype=torch.float32)
        std = torch.tensor(data_config["std"], dtype=torch.float32)
        shapes = {
            "seed": config.seed,
            "image_size": int(data_config["input_size"][-1]),
            "noise": config.background_noise,
        }
        support = ShapesDataset(split="train", length=SUPPORT_SIZE, **shapes)
        queries = ShapesDataset(split=config.split, length=config.num_queries, **shapes)
        return ShapesItems(support, mean, std), ShapesItems(queries, mean, std)

    def evaluate(self, model: Any, ctx: BuildContext) -> dict[str, float]:
        support, queries = self.sources(model, ctx)
        metrics: dict[str, float] = {}
        with eval_mode(model):
            for shots in self.config.shots:
                predictions, references = [], []
                for items, keep in my_batches(len(queries), self.config.batch_size):
                    batch = [queries[i] for i in items]
                    prompts = [
                        self.prompt(item, self.examples_for(index, shots, support), shots, queries)
                        for index, item in zip(items, batch)
                    ]
                    generated = self.generate(model, prompts, ctx.device)
                    if keep:
                        predictions += generated
                        references += [self.references(item) for item in batch]
                metrics |= self.score(shots, gather_list(predictions), gather_list(references))
        if self.real_questions:
            metrics["skipped_lines"] = float(ctx.parts["data"].skipped(self.config.split))
        elif self.config.task == "vqa":
            metrics["chance"] = 1 / len(ATTRIBUTES[self.config.attribute])
        return metrics

    def generate(self, model: Any, prompts: list[tuple[str, torch.Tensor]], device: str) -> list[str]:
        fusion = model.fusion
        tokens = tokenize_padded(
            fusion.tokenizer, [text for text, _ in prompts], MAX_PROMPT_TOKENS, side="left"
        )
        images = torch.stack([images for _, images in prompts])  # (B, T, 3, H, W)
        media = model.adapter.encode_images(model.vision, images.to(device))  # (B,T,n,d_v)
        rows = greedy_generate(
            fusion,
            media,
            tokens["input_ids"].to(device),
            tokens["attention_mask"].to(device),
            max_new_tokens=self.max_new_tokens,
            stop_ids=[fusion.end_of_chunk_token_id, fusion.tokenizer.eos_token_id],
        )
        return [fusion.tokenizer.decode(row, skip_special_tokens=True) for row in rows]

    def score(self, shots: int, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if self.real_questions:
            scores = [vqa_accuracy(vqa_answer_of(p), answers) for p, answers in zip(predictions, references)]
            return {f"{shots}shot_vqa_accuracy": 100 * float(np.mean(scores))}
        exact = float(
            np.mean(
                [
                    any(normalize_answer(p) == normalize_answer(r) for r in refs)
                    for p, refs in zip(predictions, references)
                ]
            )
        )
        if self.config.task == "vqa":
            return {f"{shots}shot_accuracy": exact}
        normalized = [[normalize_answer(r) for r in refs] for refs in references]
        cider = 100 * cider_d([normalize_answer(p) for p in predictions], normalized)
        return {f"{shots}shot_cider": cider, f"{shots}shot_exact_match": exact}
