"""``flip.masked_text``: the ``hf.text`` tower plus FLIP's optional text masking (a paper ablation).

In training, each caption keeps K = ⌊L·(1 − mask_ratio)⌋ of its L (padded)
token positions, chosen at random; with ``padding_first`` every padding
position is dropped before any real token, so short captions lose padding
only. The first token ([CLS], read by first-token pooling) is always kept,
and kept tokens keep their original position ids. Eval mode sees all tokens.

Shapes: B batch, L padded text length, K kept tokens, D width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from vlforge_plugins.flip.masking import StepGenerator, keep_count, lowest_indices

from vlforge.components import TextOutput
from vlforge.encoders.text import HFText
from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge.engine import TrainState


def text_keep_indices(
    noise: torch.Tensor, attention_mask: torch.Tensor, keep: int, padding_first: bool
) -> torch.Tensor:
    """(B, L) U[0,1) noise, (B, L) mask (1 = real) -> (B, K) kept positions, ascending.

    Padding scores are lifted into [1, 2) so they rank after every real token;
    the first position scores −1 so it is always kept.
    """
    scores = noise + (attention_mask == 0).to(noise.dtype) if padding_first else noise.clone()
    scores[:, 0] = -1.0
    return lowest_indices(scores, keep)


def position_offset(model: nn.Module) -> int:
    """Position id of a sequence's first token: RoBERTa-family embeddings count from padding_idx + 1."""
    padding_idx = getattr(getattr(model, "embeddings", None), "padding_idx", None)
    return 0 if padding_idx is None else padding_idx + 1


class MaskedText(HFText):
    """``HFText`` whose training forward drops tokens first; parameters and state-dict keys as ``hf.text``."""

    def __init__(self, encoder: HFText, mask_ratio: float, padding_first: bool, generator: StepGenerator):
        super().__init__(encoder.model, encoder.tokenizer, encoder.max_length, encoder.pool_type)
        self.embed_dim, self.proj = encoder.embed_dim, encoder.proj  # adopt, do not re-create
        self.mask_ratio = mask_ratio
        self.padding_first = padding_first
        self.generator = generator
        self.position_offset = position_offset(encoder.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        if not self.training or self.mask_ratio == 0:
            return super().forward(input_ids, attention_mask)
        noise = self.generator.uniform(tuple(input_ids.shape), input_ids.device)  # (B, L)
        keep = keep_count(input_ids.shape[1], self.mask_ratio)
        kept = text_keep_indices(noise, attention_mask, keep, self.padding_first)  # (B, K)
        ids, mask = input_ids.gather(1, kept), attention_mask.gather(1, kept)
        positions = kept + self.position_offset
        tokens = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        pooled = self.pool(tokens, mask)  # (B, D)
        return TextOutput(tokens=tokens, pooled=pooled, embedding=self.project(pooled), attention_mask=mask)

    @hookimpl
    def vlforge_step_start(self, state: TrainState) -> None:
        self.generator.reseed(state.rank, state.step)
