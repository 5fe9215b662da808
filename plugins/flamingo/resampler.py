"""The Perceiver Resampler: any number of visual tokens in, a fixed number of latents out.

Shapes: B batch, T media (images) per sequence, F frames per medium (1 for
images), v visual tokens per frame, d visual width, n latents.

Each layer updates the latents with attention whose queries are the latents
and whose keys/values are the media tokens concatenated with the latents
(separate LayerNorms for the two), then with a feed-forward block; a final
LayerNorm ends the stack. Media are resampled independently of each other
(the time axis is kept), so every image gets its own n tokens.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge.engine import TrainState


class FeedForward(nn.Sequential):
    """LN -> Linear(d, mult·d) -> GELU -> Linear(mult·d, d), bias-free (Flamingo's FFW)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, heads·h) -> (..., heads, L, h)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, h) -> (..., L, heads·h)."""
    return x.transpose(-3, -2).flatten(-2)


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents); bias-free projections."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (B,T,M,d), latents (B,T,n,d) -> update for the latents (B,T,n,d)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = split_heads(self.to_q(latents), self.heads)  # (B,T,heads,n,h)
        k, v = self.to_kv(torch.cat([media, latents], dim=-2)).chunk(2, dim=-1)  # (B,T,M+n,inner) each
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)  # (B,T,heads,M+n,h)
        # SDPA on (B·T,heads,L,h): inductor's CPU attention lowering rejects 5-D inputs whose query
        # and key lengths differ (n vs M+n), so the media axis joins the batch axis.
        out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1))
        return self.to_out(merge_heads(out.unflatten(0, q.shape[:2])))


def resampler_layer(layer: nn.ModuleList, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """One resampler layer: media (B,T,M,d), latents (B,T,n,d) -> latents (B,T,n,d)."""
    attention, feed_forward = layer
    latents = latents + attention(media, latents)
    return latents + feed_forward(latents)


class PerceiverResampler(nn.Module):
    """(B,T,F,v,d) visual tokens -> (B,T,n,d) latents per medium.

    ``max_media``/``max_frames`` add learned media-time / frame embeddings
    (0: none, as in OpenFlamingo); no spatial position is added (paper).
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 6,
        num_latents: int = 64,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        max_media: int = 0,
        max_frames: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.width = dim
        self.gradient_checkpointing = gradient_checkpointing
        self.num_latents = num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embed = nn.Parameter(torch.randn(max_frames, dim)) if max_frames else None
        self.media_time_embed = nn.Parameter(torch.randn(max_media, 1, dim)) if max_media else None
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), FeedForward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def shard_units(self) -> list[nn.Module]:
        """FSDP/compile units (``ShardUnitsLike``): each layer's attention and feed-forward."""
        return [module for layer in self.layers for module in layer]

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """(B,T,F,v,d) -> (B,T,n,d); any v, T up to ``max_media`` and F up to ``max_frames`` if set."""
        batch, num_media, num_frames = media.shape[:3]
        if self.frame_embed is not None:
            media = media + self.frame_embed[:num_frames, None]  # (F,1,d) broadcast over v
        media = media.flatten(2, 3)  # (B,T,F·v,d)
        if self.media_time_embed is not None:
            media = media + self.media_time_embed[:num_media]  # (T,1,d)
        latents = self.latents.expand(batch, num_media, -1, -1)  # (B,T,n,d)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                latents = checkpoint(resampler_layer, layer, media, latents, use_reentrant=False)
            else:
                latents = resampler_layer(layer, media, latents)
        return self.norm(latents)


class PerceiverAdapter(PerceiverResampler):
    """The ``flamingo.perceiver`` adapter: a (frozen) vision encoder's tokens -> resampled media.

    With ``freeze_vision`` the encoder runs under no_grad and is put back in
    eval mode at the start of every step (evaluators restore the run's mode
    after they finish).
    """

    def __init__(
        self, dim: int, *, freeze_vision: bool = True, drop_prefix_tokens: bool = True, **options: Any
    ) -> None:
        super().__init__(dim, **options)
        self.freeze_vision = freeze_vision
        self.drop_prefix_tokens = drop_prefix_tokens

    def encode_images(self, vision: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(B,T,3,H,W) images -> (B,T,n,d) media (zero images in unused slots are harmless)."""
        batch, num_media = images.shape[:2]
        with torch.no_grad() if self.freeze_vision else contextlib.nullcontext():
            tokens = vision(images.flatten(0, 1)).tokens  # (B·T, P+N, d)
        if self.drop_prefix_tokens:
            tokens = tokens[:, vision.num_prefix_tokens :]  # (B·T, N, d): patch tokens only
        return self(tokens.unflatten(0, (batch, num_media))[:, :, None])  # (B,T,1,N,d) -> (B,T,n,d)

    @hookimpl
    def vlforge_step_start(self, state: TrainState) -> None:
        if self.freeze_vision:
            state.model.vision.eval()
