"""eval components (registered by vlforge.builtin).

This module stays light (no torch import): it holds the config models and
registers factories that import the heavy code when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from vlforge.registry import ComponentConfig, Registry

if TYPE_CHECKING:
    from vlforge.components import BuildContext


class RetrievalConfig(ComponentConfig):
    """``[evaluators.<name>] type = "retrieval"``: image<->text R@1/5/10 over image groups of a split."""

    split: str = Field(
        "val", description="split of the evaluator's data ([evaluators.<name>.data] or [data])"
    )
    batch_size: int = Field(256, ge=1, description="images embedded per forward pass (with their captions)")

    def data_problems(self, data: Any, data_type: str) -> list[tuple[str, str]]:
        return split_problems(self.split, data, data_type)


class ZeroShotConfig(ComponentConfig):
    """``[evaluators.<name>] type = "zeroshot"``: classify images by their nearest class prompt."""

    split: str = Field(
        "val", description="split of the evaluator's data ([evaluators.<name>.data] or [data])"
    )
    attribute: str | None = Field(
        None, description="label to classify (a key of the batch's 'labels'); default: the data's only one"
    )
    class_names: str | None = Field(
        None,
        description="file of class names, one per line in label order, or 'imagenet'; default: the data's",
    )
    templates: list[str] | str | None = Field(
        None,
        description="prompts with '{}' for the class name: a list, a file (one per line), or 'imagenet' "
        "(CLIP's 80) / 'imagenet_simple' (7); default: the data source's own",
    )
    batch_size: int = Field(256, ge=1, description="items or prompts embedded per forward pass")

    def data_problems(self, data: Any, data_type: str) -> list[tuple[str, str]]:
        """(key, problem) for what would fail only after training: no labels, no split, no file."""
        problems = split_problems(self.split, data, data_type)
        labels = data.label_names() if hasattr(data, "label_names") else None
        if labels is not None:
            if not labels:
                problems.append(
                    (
                        "data",
                        f"zero-shot needs labelled images, and data type '{data_type}' "
                        "gives none (use imagefolder, or webdataset with class_field)",
                    )
                )
            elif self.attribute is None and len(labels) > 1:
                problems.append(
                    ("attribute", f"name the label to classify (the data's labels: {', '.join(labels)})")
                )
            elif self.attribute is not None and self.attribute not in labels:
                problems.append(
                    (
                        "attribute",
                        f"'{self.attribute}' is not a label of the data (labels: {', '.join(labels)})",
                    )
                )
        if self.class_names is None and data_type == "webdataset":
            problems.append(
                ("class_names", "webdataset shards carry no class names: give a file or 'imagenet'")
            )
        problems += [
            (key, problem)
            for key, value, builtin in (
                ("class_names", self.class_names, ("imagenet",)),
                ("templates", self.templates, ("imagenet", "imagenet_simple")),
            )
            if isinstance(value, str) and value not in builtin
            for problem in missing_file(value, builtin)
        ]
        return problems

    @field_validator("templates")
    @classmethod
    def _has_placeholder(cls, templates: list[str] | str | None) -> list[str] | str | None:
        if isinstance(templates, list):
            if not templates:
                raise ValueError("give at least one template, or leave it out for the data source's own")
            for template in templates:
                if "{}" not in template:
                    raise ValueError(f"template '{template}' has no '{{}}' for the class name")
        return templates


def split_problems(split: str, data: Any, data_type: str) -> list[tuple[str, str]]:
    """(key, problem) when the data table's config says it has no held-out split ``split``."""
    splits = data.held_out_splits() if hasattr(data, "held_out_splits") else None
    if splits is None or split in splits:
        return []
    return [
        ("split", f"data type '{data_type}' has no split '{split}' (splits: {', '.join(splits) or 'none'})")
    ]


def missing_file(location: str, builtin: tuple[str, ...]) -> list[str]:
    """A problem when ``location`` (path or fsspec URL) is no readable file; nothing for remote URLs."""
    if "://" in location:
        return []  # an object store may only be reachable where the run runs
    from pathlib import Path

    if Path(location).is_file():
        return []
    return [f"no file '{location}' (built-in: {', '.join(builtin)})"]


def build_retrieval(config: RetrievalConfig, ctx: BuildContext) -> Any:
    """Image-to-text and text-to-image recall at 1, 5 and 10, with the chance level."""
    from vlforge.eval.retrieval import RetrievalEvaluator

    return RetrievalEvaluator(config)


def build_zeroshot(config: ZeroShotConfig, ctx: BuildContext) -> Any:
    """Zero-shot classification: top-1/top-5 accuracy, mean per-class recall, chance level."""
    from vlforge.eval.zeroshot import ZeroShotEvaluator

    return ZeroShotEvaluator(config)


def register(registry: Registry) -> None:
    """Add this package's components to the registry."""
    registry.add("evaluator", "retrieval", config=RetrievalConfig, factory=build_retrieval)
    registry.add("evaluator", "zeroshot", config=ZeroShotConfig, factory=build_zeroshot)
