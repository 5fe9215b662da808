"""Zero-shot classification: each image takes the class whose prompts it is nearest to.

A class embedding is the mean of the normalised embeddings of its prompts
(one per template, the class name filled in), normalised again: CLIP's
prompt ensembling. Class names and default templates come from the data
source (``class_names(attribute)``, ``prompt_templates(attribute)``); the
true class of an image is ``batch["labels"][attribute]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.eval.retrieval import embed_split, eval_mode

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.eval import ZeroShotConfig

TOP_K = 5


def class_embeddings(
    model: Any, tokenize: Any, names: list[str], templates: list[str], *, batch_size: int, device: str
) -> torch.Tensor:
    """(C, E) normalised: per class, the re-normalised mean of its normalised prompt embeddings."""
    prompts = [template.format(name) for name in names for template in templates]  # class-major
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenize(prompts[start : start + batch_size])
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        embeddings.append(F.normalize(model.encode_text(ids, mask).float().cpu(), dim=-1))  # (b, E)
    per_prompt = torch.cat(embeddings).view(len(names), len(templates), -1)  # (C, T, E)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def accuracies(images: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy of (N,E) images against (C,E) classes, with labels (N,)."""
    top = (images @ classes.T).topk(min(TOP_K, len(classes)), dim=1).indices  # (N, k)
    correct = top == labels[:, None]  # (N, k)
    return {
        "top1": float(correct[:, 0].float().mean()),
        "top5": float(correct.any(dim=1).float().mean()),
        "chance_top1": 1.0 / len(classes),  # a uniform random guess, whatever the class balance
    }


class ZeroShotEvaluator:
    """Top-1/top-5 zero-shot accuracy on one attribute over a whole split of ``ctx.parts["data"]``.

    Computed on the full split in the calling process, with no collective
    calls: the engine runs it on rank 0 and broadcasts.
    """

    def __init__(self, config: ZeroShotConfig) -> None:
        self.config = config

    def evaluate(self, model: nn.Module, ctx: BuildContext) -> dict[str, float]:
        data, attribute = ctx.parts["data"], self.config.attribute
        names = data.class_names(attribute)
        templates = self.config.templates or data.prompt_templates(attribute)
        with eval_mode(model):
            classes = class_embeddings(
                model,
                ctx.parts["text"].tokenize,
                names,
                templates,
                batch_size=self.config.batch_size,
                device=ctx.device,
            )
            split = embed_split(
                model,
                data,
                self.config.split,
                batch_size=self.config.batch_size,
                device=ctx.device,
                with_text=False,
            )
        if attribute not in split.labels:
            raise ValueError(
                f"zero-shot attribute '{attribute}' is not among the data's labels "
                f"(labels: {', '.join(split.labels) or 'none'})"
            )
        return accuracies(split.images, classes, split.labels[attribute])
