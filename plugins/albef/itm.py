"""``albef.itm``: image-text matching on the fusion encoder's CLS, with in-batch hard negatives.

For each text one negative image, and for each image one negative text, is drawn
from the softmax of the ITC similarities over the local batch (methods.md §2.4).
Positives, and with image ids every item of the same image, are set to −inf
*before* the softmax, in fp32 (LAVIS; ALBEF zeroes the diagonal after it). A row
left with no candidate (every other item shows the same image) falls back to a
uniform draw over all other items. A micro-batch of one has no negative at all:
that is an error, raised when the run is built and again here.

The fusion encoder then scores 3B pairs in one pass:
``[(text_b, image_b)] + [(text_b, negative image_b)] + [(negative text_b, image_b)]``
with labels ``[1]*B + [0]*2B`` (ALBEF's order). ``albef/itm_accuracy`` (rank 0's
micro-batches since the last log; always-"no" scores 2/3) is logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from vlforge_plugins.albef.itc import NEGATIVE_LOGITS

from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge.engine import TrainState


def sample_negatives(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, B) similarities, −inf where drawing is forbidden -> (B,) one index per row, never the row's own.

    Draws from softmax over each row (in fp32). A row with no finite entry draws
    uniformly from every other index.
    """
    batch = logits.shape[0]
    if batch < 2:
        raise ValueError("albef.itm: a micro-batch of 1 has no negative to draw; use at least 2 per rank")
    own = torch.eye(batch, dtype=torch.bool, device=logits.device)
    logits = logits.float().masked_fill(
        own | logits.isnan(), float("-inf")
    )  # NaN (AMP overflow): no candidate
    has_candidate = torch.isfinite(logits).any(dim=1, keepdim=True)  # (B, 1)
    weights = torch.where(has_candidate, logits.softmax(dim=1), (~own).float())  # (B, B)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def matching_batch(
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    negative_images: torch.Tensor,
    negative_texts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 3B (text, image) pairs and labels: positives, text + negative image, negative text + image.

    text_tokens (B,L,D), text_mask (B,L), image_tokens (B,T,Dv), indices (B,) ->
    texts (3B,L,D), masks (3B,L), images (3B,T,Dv), labels (3B,).
    """
    batch = text_tokens.shape[0]
    texts = torch.cat([text_tokens, text_tokens, text_tokens[negative_texts]])
    masks = torch.cat([text_mask, text_mask, text_mask[negative_texts]])
    images = torch.cat([image_tokens, image_tokens[negative_images], image_tokens])
    labels = torch.cat([text_mask.new_ones(batch), text_mask.new_zeros(2 * batch)]).long()
    return texts, masks, images, labels


class ImageTextMatching(nn.Module):
    """``albef.itm``: ``objective(step)`` -> ``{"itm": loss}``; runs after ``albef.itc`` in the same step."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = nn.Linear(width, 2)
        self.correct = torch.zeros((), dtype=torch.long)
        self.seen = torch.zeros((), dtype=torch.long)

    def forward(self, step: Any) -> dict[str, torch.Tensor]:
        if NEGATIVE_LOGITS not in step.cache:
            raise RuntimeError(
                "albef.itm draws its negatives from albef.itc: list an albef.itc objective first"
            )
        logits_i2t, logits_t2i = step.cache[NEGATIVE_LOGITS]  # (B, B), positives at −inf
        with torch.no_grad():
            negative_images = sample_negatives(logits_t2i)  # for each text
            negative_texts = sample_negatives(logits_i2t)  # for each image
        text = step.text
        texts, masks, images, labels = matching_batch(
            text.tokens, text.attention_mask, step.image.tokens, negative_images, negative_texts
        )
        scores = self.score(step.model.fusion, texts, masks, images)  # (3B, 2)
        if self.training:
            self.count(scores.detach(), labels)
        return {"itm": F.cross_entropy(scores, labels)}

    def score(
        self, fusion: nn.Module, texts: torch.Tensor, masks: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """(N,L,D), (N,L), (N,T,Dv) -> (N, 2) fp32 logits [no match, match] from the fused CLS."""
        return self.head(fusion(texts, masks, images)[:, 0]).float()

    @torch.no_grad()
    def count(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        if self.correct.device != scores.device:
            self.correct, self.seen = self.correct.to(scores.device), self.seen.to(scores.device)
        self.correct += (scores.argmax(dim=1) == labels).sum()
        self.seen += labels.numel()

    @hookimpl
    def vlforge_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        if int(self.seen):
            metrics["albef/itm_accuracy"] = int(self.correct) / int(self.seen)
        self.correct.zero_()
        self.seen.zero_()
