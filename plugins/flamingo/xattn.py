"""GATED XATTN-DENSE: tanh-gated cross-attention to media plus a gated feed-forward.

Shapes: B batch, L text length, T media per sequence, n latents per medium,
d LM width, d_v visual width.

Media-location masking: ``text_time`` (B,L) numbers each text token by the
images that precede it (1-based: the ``<image>`` token itself belongs to its
own image; 0 before the first image). A token attends to the latents of image
m iff ``text_time == m`` (only the immediately preceding image, the paper's
rule) or ``text_time >= m`` (all previous images). Masked logits get the
dtype's most negative finite value, never -inf, so a fully masked row stays
finite; rows that may attend to nothing (``text_time == 0``) are then zeroed
in both modes, so text before any image gets exactly 0 from the
cross-attention (and no future image leaks into it through a uniform softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vlforge_plugins.flamingo.resampler import FeedForward, merge_heads, split_heads


def text_time(
    input_ids: torch.Tensor, image_token_id: int, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,L) ids -> (B,L) long: images seen up to and including each position.

    ``offset`` (B,) is the count already seen before these ids (cached media
    during generation): new tokens without an ``<image>`` then attend to the
    last cached image.
    """
    times = (input_ids == image_token_id).cumsum(dim=-1)
    return times if offset is None else times + offset[:, None]


def media_allowed(
    times: torch.Tensor, num_media: int, latents_per_medium: int, only_immediate: bool = True
) -> torch.Tensor:
    """(B,L) text times -> (B,L,T·n) bool: may text token l attend to media token j."""
    media_time = torch.arange(1, num_media + 1, device=times.device).repeat_interleave(latents_per_medium)
    if only_immediate:
        return times[..., None] == media_time  # (B,L,T·n)
    return times[..., None] >= media_time


class MaskedCrossAttention(nn.Module):
    """Text queries (LN'd), media keys/values (already LN'd by the resampler); bias-free."""

    def __init__(
        self, dim: int, media_dim: int, heads: int = 8, dim_head: int = 64, only_immediate: bool = True
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.only_immediate = only_immediate
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, text: torch.Tensor, media: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """text (B,L,d), media (B,T,n,d_v), times (B,L) -> (B,L,d); exactly 0 where no medium is allowed."""
        num_media, latents = media.shape[1:3]
        q = split_heads(self.to_q(self.norm(text)), self.heads)  # (B,heads,L,h)
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)  # (B,T·n,inner) each
        allowed = media_allowed(times, num_media, latents, self.only_immediate)[:, None]  # (B,1,L,T·n)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~allowed, -torch.finfo(q.dtype).max)  # finite: a fully masked row stays finite
        out = F.scaled_dot_product_attention(q, split_heads(k, self.heads), split_heads(v, self.heads), bias)
        # Rows that may see no media (text before the first image, or an image index with no
        # media behind it) attended uniformly over masked logits: zero them.
        has_media = allowed.any(dim=-1, keepdim=True)  # (B,1,L,1)
        return self.to_out(merge_heads(out * has_media))


class GatedCrossAttentionBlock(nn.Module):
    """y + tanh(α_xattn)·XAttn(y, media), then + tanh(α_dense)·FFW(y); both gates start at 0.

    At initialisation the block is the identity, bitwise: tanh(0)·(finite) = 0.
    """

    def __init__(
        self,
        dim: int,
        media_dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        only_immediate: bool = True,
    ) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim, media_dim, heads, dim_head, only_immediate)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, text: torch.Tensor, media: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """(B,L,d), (B,T,n,d_v), (B,L) -> (B,L,d)."""
        text = text + self.attn_gate.tanh() * self.attn(text, media, times)
        return text + self.ff_gate.tanh() * self.ff(text)
