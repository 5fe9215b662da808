"""``flamingo.lm``: next-token NLL of text conditioned on its preceding images.

One micro-batch comes from one dataset (its name in ``batch["dataset"]``, as
``flamingo.shapes`` and any cycling mixture mark it). The term is named
after the dataset and weighted by its λ times M, the number of weighted
datasets: the engine averages the micro-batches of an optimizer step, so
with one batch of every dataset per round a step's loss is Σ_m λ_m·L_m
(the paper's objective) and each logged term ``lm.<dataset>`` is that
dataset's share λ_m·L_m of it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vlforge_plugins.flamingo.data import IGNORE, planned_sequences


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,L,V) logits, (B,L) labels -> mean NLL of each supervised token given the ones before it.

    In fp32; a batch without a supervised token gives 0, never NaN.
    """
    targets = labels[:, 1:]  # position l predicts token l+1
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return total / (targets != IGNORE).sum().clamp(min=1)


class FlamingoObjective(nn.Module):
    """``objective(step)`` -> ``{dataset name: λ·M·NLL}`` (or ``{"nll": NLL}`` without weights)."""

    def __init__(self, dataset_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.dataset_weights = dict(dataset_weights or {})

    def forward(self, step: Any) -> dict[str, torch.Tensor]:
        model, batch = step.model, step.batch
        media = model.adapter.encode_images(model.vision, batch["images"])  # (B,T,n,d_v)
        logits = model.fusion(batch["input_ids"], batch["attention_mask"], media).logits  # (B,L,V)
        loss = lm_loss(logits, batch["labels"])
        if not self.dataset_weights:
            return {batch.get("dataset", "nll"): loss}
        name = batch.get("dataset")
        if name not in self.dataset_weights:
            raise KeyError(
                f"flamingo.lm: batch from dataset {name!r} has no weight in dataset_weights "
                f"({', '.join(self.dataset_weights)})"
            )
        return {name: self.dataset_weights[name] * len(self.dataset_weights) * loss}

    def plan_batches(self, model: Any, recipe: Any, micro_batch: int) -> dict[str, dict[str, Any]]:
        """``PlanBatchesLike``: the largest micro-batch of every dataset (images per sequence, tokens)."""
        image_shape = model.vision.data_config["input_size"]
        batches = {}
        for name, (samples, images, tokens) in planned_sequences(recipe.data, micro_batch).items():
            batches[name] = {
                "images": torch.zeros(samples, images, *image_shape),
                "input_ids": torch.zeros(samples, tokens, dtype=torch.long),
                "attention_mask": torch.ones(samples, tokens, dtype=torch.long),
                "labels": torch.zeros(samples, tokens, dtype=torch.long),
                "dataset": name,
            }
        return batches
