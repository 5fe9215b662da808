"""Composes the components a recipe names into one ``nn.Module``.

Build order follows dependencies: encoders, adapter, fusion and masking first
(their factories see nothing else), then the teacher (it copies parts), then
objectives (they may use every part), then the dataset and evaluators (they
use the tokenizer and the image config). Each factory gets the parts built
before it in ``ctx.parts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from vlforge.components import BuildContext, TextOutput, VisionOutput
from vlforge.optim import apply_locks, lr_scales
from vlforge.plugins import Plugins
from vlforge.recipe import ComponentTable, Recipe

PART_KINDS = {
    "vision": "vision_encoder",
    "text": "text_encoder",
    "adapter": "adapter",
    "fusion": "fusion",
    "masking": "masking",
}


@dataclass
class Progress:
    """Where training is; schedules inside components read it (e.g. a distillation warm-up)."""

    step: int = 0  # optimizer steps taken before this one
    epoch: int = 0
    samples_seen: int = 0  # global samples before this step
    steps_per_epoch: int = 1
    total_steps: int = 1


class Step:
    """One micro-batch as objectives see it: the batch plus features computed on first use.

    Objectives share features: the first one that reads ``step.image`` pays
    for the vision forward, the others reuse it. Masking applies in training
    mode only (the masking component checks ``self.training``). Other values
    objectives share within the micro-batch (e.g. a teacher's features) go in
    ``cache``, under keys prefixed by the plugin's name.
    """

    def __init__(self, model: VLModel, batch: dict[str, Any], progress: Progress) -> None:
        self.model = model
        self.batch = batch
        self.progress = progress
        self.cache: dict[str, Any] = {}

    @cached_property
    def image(self) -> VisionOutput:
        return self.model.vision(self.batch["images"], masking=self.model.masking)

    @cached_property
    def text(self) -> TextOutput:
        return self.model.text(self.batch["input_ids"], self.batch["attention_mask"])


class VLModel(nn.Module):
    """The parts of a run: encoders, adapter, fusion, masking, teacher and weighted objectives."""

    def __init__(
        self,
        parts: dict[str, nn.Module | None],
        objectives: dict[str, nn.Module],
        weights: dict[str, float],
        teacher: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.vision = parts.get("vision")
        self.text = parts.get("text")
        self.adapter = parts.get("adapter")
        self.fusion = parts.get("fusion")
        self.masking = parts.get("masking")
        self.teacher = teacher
        self.objectives = nn.ModuleDict(objectives)
        self.weights = dict(weights)

    def forward(
        self, batch: dict[str, Any], progress: Progress
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total loss and every named term (unweighted) for one micro-batch."""
        step = Step(self, batch, progress)
        total: torch.Tensor | float = 0.0
        terms: dict[str, torch.Tensor] = {}
        for name, objective in self.objectives.items():
            for term, value in objective(step).items():
                terms[name if term == name else f"{name}.{term}"] = value
                total = total + self.weights[name] * value
        assert isinstance(total, torch.Tensor), "objectives returned no loss terms"
        return total, terms

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B,E) normalised joint embeddings (no masking in eval mode)."""
        return self.vision(images).embedding

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,L) -> (B,E) normalised joint embeddings."""
        return self.text(input_ids, attention_mask).embedding


def build_component(plugins: Plugins, kind: str, table: ComponentTable, ctx: BuildContext) -> Any:
    return plugins.registry.get(kind, table.type).factory(table.config, ctx)


def build_model(recipe: Recipe, plugins: Plugins, ctx: BuildContext) -> VLModel:
    """Build every model part the recipe names, in dependency order, into ``ctx.parts``."""
    for part, kind in PART_KINDS.items():
        table = recipe.masking if part == "masking" else getattr(recipe.model, part)
        ctx.parts[part] = build_component(plugins, kind, table, ctx) if table else None
    teacher = build_component(plugins, "teacher", recipe.teacher, ctx) if recipe.teacher else None
    ctx.parts["teacher"] = teacher
    objectives = {
        name: build_component(plugins, "objective", table, ctx) for name, table in recipe.objectives.items()
    }
    weights = {name: table.weight for name, table in recipe.objectives.items()}
    model = VLModel(ctx.parts, objectives, weights, teacher)
    apply_locks(model, recipe.optim)  # here, so --dry-run counts what trains
    lr_scales(model, recipe.optim)  # refuses multiplier / decay keys that name no parameter
    return model


def parameter_counts(model: VLModel) -> dict[str, tuple[int, int]]:
    """part -> (total, trainable) parameter counts; works on the meta device."""
    counts = {}
    for name, module in model.named_children():
        params = list(module.parameters())
        if params:
            counts[name] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
    return counts
