"""Zero-shot classification: each image takes the class whose prompts it is nearest to.

A class embedding is the mean of the normalised embeddings of its prompts
(one per template, the class name filled in), normalised again: CLIP's
prompt ensembling. Class names come from the evaluator (a file, or the
built-in ``imagenet`` list) or the data source (``class_names(label,
split)``: an ImageFolder's folder names, the generated shapes' attribute
values); templates from the evaluator (a list, a file, or a built-in set:
``imagenet`` (CLIP's 80), ``imagenet_simple`` (7)) or the data source
(``prompt_templates(label)``). The true class of an image is
``batch["labels"][label]``.

Metrics (CLIP_benchmark's): top-1 and top-5 accuracy, mean per-class recall
(the mean over classes present of the fraction of their images classified
right: what matters on imbalanced sets), and the chance level 1 / classes.
Prompts and images are embedded on every rank, each its share, and gathered.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.errors import UserError
from vlforge.eval.retrieval import embed_split
from vlforge.eval.shards import eval_mode, gather_rows, my_batches

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.eval import ZeroShotConfig

TOP_K = 5
BUILTIN_CLASS_NAMES = {"imagenet": "imagenet_classes.txt"}
BUILTIN_TEMPLATES = {"imagenet": "imagenet_templates.txt", "imagenet_simple": "imagenet_simple_templates.txt"}


def read_lines(source: str, builtin: dict[str, str], key: str) -> list[str]:
    """Non-empty lines of a built-in list (by name) or of a text file (path or URL)."""
    if source in builtin:
        return _lines(
            resources.files("vlforge.eval").joinpath("metadata", builtin[source]).read_text("utf-8")
        )
    import fsspec

    try:
        with fsspec.open(source, "rt", encoding="utf-8") as stream:
            return _lines(stream.read())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{key}: cannot read '{source}' ({exc}); built-in: {', '.join(builtin)}") from exc


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_embeddings(
    model: Any, tokenize: Any, names: list[str], templates: list[str], *, batch_size: int, device: str
) -> torch.Tensor:
    """(C, E) normalised: per class, the re-normalised mean of its normalised prompt embeddings."""
    prompts = [template.format(name) for name in names for template in templates]  # class-major
    embeddings = []
    for items, keep in my_batches(len(prompts), batch_size):
        tokens = tokenize(prompts[items.start : items.stop])
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        embedding = F.normalize(model.encode_text(ids, mask).float().cpu(), dim=-1)  # (b, E)
        if keep:
            embeddings.append(embedding)
    per_prompt = gather_rows(embeddings).view(len(names), len(templates), -1)  # (C, T, E)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def accuracies(images: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall of (N,E) images against (C,E) classes, labels (N,)."""
    top = (images @ classes.T).topk(min(TOP_K, len(classes)), dim=1).indices  # (N, k)
    correct = top == labels[:, None]  # (N, k)
    present = labels.unique()
    per_class = torch.stack([correct[labels == c, 0].float().mean() for c in present])  # (classes present,)
    return {
        "top1": float(correct[:, 0].float().mean()),
        "top5": float(correct.any(dim=1).float().mean()),
        "mean_per_class_recall": float(per_class.mean()),
        "chance_top1": 1.0 / len(classes),  # a uniform random guess, whatever the class balance
    }


class ZeroShotEvaluator:
    """Top-1/top-5/mean per-class recall on one label over a whole split of ``ctx.parts["data"]``."""

    def __init__(self, config: ZeroShotConfig) -> None:
        self.config = config

    def label(self, data: Any) -> str:
        if self.config.attribute is not None:
            return self.config.attribute
        names = data_label_names(data)
        if len(names) != 1:
            raise UserError(
                "zero-shot: name the label to classify with 'attribute' "
                f"(the data's labels: {', '.join(names) or 'none'})"
            )
        return names[0]

    def class_names(self, data: Any, label: str) -> list[str]:
        if self.config.class_names is not None:
            return read_lines(self.config.class_names, BUILTIN_CLASS_NAMES, "class_names")
        return data.class_names(label, self.config.split)

    def templates(self, data: Any, label: str) -> list[str]:
        templates = self.config.templates
        if isinstance(templates, list):
            return templates
        if templates is not None:
            lines = read_lines(templates, BUILTIN_TEMPLATES, "templates")
            if not lines or any("{}" not in line for line in lines):
                raise UserError(f"templates: every line of '{templates}' needs a '{{}}' for the class name")
            return lines
        if hasattr(data, "prompt_templates"):
            return data.prompt_templates(label)
        return ["a photo of a {}."]

    def evaluate(self, model: nn.Module, ctx: BuildContext) -> dict[str, float]:
        data = ctx.parts["data"]
        label = self.label(data)
        names = self.class_names(data, label)
        with eval_mode(model):
            classes = class_embeddings(
                model,
                ctx.parts["text"].tokenize,
                names,
                self.templates(data, label),
                batch_size=self.config.batch_size,
                device=ctx.device,
            )
            split = embed_split(
                data,
                self.config.split,
                batch_size=self.config.batch_size,
                encode_images=lambda images: {
                    "embedding": model.encode_image(images.to(ctx.device)).float().cpu()
                },
            )
        if label not in split.labels:
            raise UserError(
                f"zero-shot label '{label}' is not among the data's labels "
                f"(labels: {', '.join(split.labels) or 'none'})"
            )
        labels = split.labels[label]
        if int(labels.max()) >= len(names):
            raise UserError(
                f"zero-shot: label {int(labels.max())} in the data, but only {len(names)} class names"
            )
        return accuracies(split.images["embedding"], classes, labels)


def data_label_names(data: Any) -> list[str]:
    """The labels a built data source's items carry (its config's ``label_names``), if it says."""
    config = getattr(data, "config", None)
    return list(config.label_names()) if hasattr(config, "label_names") else []
