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
    """``[evaluators.<name>] type = "retrieval"``: image<->text R@1/5/10 on a split of the run's data."""

    split: str = Field("val", description="split of the run's data source to evaluate on")
    batch_size: int = Field(256, ge=1, description="items embedded per forward pass")


class ZeroShotConfig(ComponentConfig):
    """``[evaluators.<name>] type = "zeroshot"``: classify images by their nearest class prompt."""

    split: str = Field("val", description="split of the run's data source to evaluate on")
    attribute: str = Field("shape", description="label to classify (a key of the batch's 'labels')")
    templates: list[str] | None = Field(
        None, description="prompts with '{}' for the class name; default: the data source's own"
    )
    batch_size: int = Field(256, ge=1, description="items or prompts embedded per forward pass")

    @field_validator("templates")
    @classmethod
    def _has_placeholder(cls, templates: list[str] | None) -> list[str] | None:
        if templates is not None:
            if not templates:
                raise ValueError("give at least one template, or leave it out for the data source's own")
            for template in templates:
                if "{}" not in template:
                    raise ValueError(f"template '{template}' has no '{{}}' for the class name")
        return templates


def build_retrieval(config: RetrievalConfig, ctx: BuildContext) -> Any:
    """Image-to-text and text-to-image recall at 1, 5 and 10, with the chance level."""
    from vlforge.eval.retrieval import RetrievalEvaluator

    return RetrievalEvaluator(config)


def build_zeroshot(config: ZeroShotConfig, ctx: BuildContext) -> Any:
    """Zero-shot classification top-1/top-5 accuracy on one attribute, with the chance level."""
    from vlforge.eval.zeroshot import ZeroShotEvaluator

    return ZeroShotEvaluator(config)


def register(registry: Registry) -> None:
    """Add this package's components to the registry."""
    registry.add("evaluator", "retrieval", config=RetrievalConfig, factory=build_retrieval)
    registry.add("evaluator", "zeroshot", config=ZeroShotConfig, factory=build_zeroshot)
