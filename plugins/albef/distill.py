"""Momentum distillation pieces shared by ITC and MLM: the α warm-up and the soft-target cross-entropy."""

from __future__ import annotations

import torch

from vlforge.model import Progress


def alpha_at(progress: Progress, alpha: float, warmup_epochs: float) -> float:
    """α ramped linearly from 0 over the first ``warmup_epochs`` epochs of optimizer steps, then flat.

    ALBEF (Pretrain.py): α·min(1, i / iters_per_epoch) in epoch 0, α afterwards
    (``warmup_epochs = 1``); LAVIS ramps over two epochs (``warmup_epochs = 2``).
    """
    if warmup_epochs <= 0:
        return alpha
    return alpha * min(1.0, progress.step / (warmup_epochs * progress.steps_per_epoch))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, C) logits, (N, C) target distributions -> (N,) −Σ_c targets·log_softmax(logits), in fp32."""
    return -(targets.float() * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
