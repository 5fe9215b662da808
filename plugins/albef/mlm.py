"""``albef.mlm``: masked language modelling conditioned on the image, with momentum distillation.

Masking (methods.md §2.5): each token is picked with probability 0.15, never
[PAD] or [CLS] ([SEP] may be); of the picked ones 80% become [MASK], 10% a
token drawn uniformly from the whole vocabulary and 10% stay as they are.
Labels are the original ids at picked positions and −100 elsewhere.

The masked caption runs through the text encoder and the fusion encoder
(attending to the student's image tokens); the MLM head scores every position
and the loss counts the picked ones (as the original BertForMaskedLM does:
selecting the picked rows first would need their count on the host, a
host-device sync every step). With α > 0 the momentum teacher does the same on the
same masked ids with its own, unmasked, image tokens, and

    L = (1−α)·CE(z, labels) + α·mean_picked[−Σ_v softmax(z')_v·log_softmax(z)_v],

both averaged over picked positions, in fp32. A batch with nothing picked gives
a loss of exactly 0 (still connected to every parameter, as DDP needs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from vlforge_plugins.albef.distill import alpha_at, soft_cross_entropy

if TYPE_CHECKING:
    from vlforge.model import Progress

IGNORE = -100  # label of positions that are not predicted (PyTorch's cross-entropy default)


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    never_mask: tuple[int, ...],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,L) ids -> masked ids (B,L) and labels (B,L): original ids where picked, −100 elsewhere."""

    def draw(p: float) -> torch.Tensor:  # (B,L) bool, True with probability p
        return torch.rand(input_ids.shape, device=input_ids.device, generator=generator) < p

    picked = draw(probability)
    for token in never_mask:
        picked &= input_ids != token
    labels = input_ids.masked_fill(~picked, IGNORE)
    to_mask = picked & draw(0.8)
    to_random = picked & ~to_mask & draw(0.5)
    random_ids = torch.randint(
        vocab_size, input_ids.shape, device=input_ids.device, generator=generator, dtype=input_ids.dtype
    )
    masked = input_ids.masked_fill(to_mask, mask_id)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """logits (N,V), labels (N,) (−100 where not picked), teacher softmax (N,V) or None -> scalar, fp32.

    Both terms are averaged over the picked positions, counted on the device.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        picked = labels != IGNORE  # (N,)
        count = picked.sum().clamp(min=1)
        hard = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE) / count
        if teacher_probs is None or alpha == 0:
            return hard
        soft = (soft_cross_entropy(logits, teacher_probs) * picked).sum() / count
        return (1 - alpha) * hard + alpha * soft


def masked_logits(
    text: nn.Module,
    fusion: nn.Module,
    masked_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_tokens: torch.Tensor,
) -> torch.Tensor:
    """Text encoder, fusion with the image, MLM head at every position -> (B·L, V)."""
    tokens = text(masked_ids, attention_mask).tokens  # (B,L,D)
    hidden = fusion(tokens, attention_mask, image_tokens).flatten(0, 1)  # (B·L, D)
    return fusion.mlm_logits(hidden, text.model.get_input_embeddings().weight)


class MaskedLanguageModelling(nn.Module):
    """``albef.mlm``: ``objective(step)`` -> ``{"mlm": loss}``."""

    def __init__(
        self,
        *,
        vocab_size: int,
        mask_id: int,
        never_mask: tuple[int, ...],
        probability: float,
        alpha: float,
        alpha_warmup_epochs: float,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.mask_id = mask_id
        self.never_mask = never_mask
        self.probability = probability
        self.alpha = alpha
        self.alpha_warmup_epochs = alpha_warmup_epochs

    def forward(self, step: Any) -> dict[str, torch.Tensor]:
        ids, attention_mask = step.batch["input_ids"], step.batch["attention_mask"]
        masked_ids, labels = mask_tokens(
            ids,
            vocab_size=self.vocab_size,
            mask_id=self.mask_id,
            never_mask=self.never_mask,
            probability=self.probability,
        )
        model = step.model
        logits = masked_logits(model.text, model.fusion, masked_ids, attention_mask, step.image.tokens)
        alpha = self.current_alpha(step.progress)
        teacher_probs = None
        if alpha > 0:
            with torch.no_grad():
                teacher = model.teacher
                teacher_logits = masked_logits(
                    teacher.parts["text"],
                    teacher.parts["fusion"],
                    masked_ids,
                    attention_mask,
                    teacher.image(step).tokens,
                )
                teacher_probs = teacher_logits.float().softmax(dim=-1)
        return {"mlm": mlm_loss(logits, labels.flatten(), teacher_probs, alpha)}

    def current_alpha(self, progress: Progress) -> float:
        return alpha_at(progress, self.alpha, self.alpha_warmup_epochs)
