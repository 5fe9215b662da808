"""Greedy generation with cached media and the LM's KV cache.

The prompt (left-padded, with its images) runs once; its media tensor is
kept and every new token is fed alone with the cache. New tokens contain no
``<image>`` (it is never generated), so they continue the prompt's text time:
they attend to the last image of their prompt (cached-media mode).
"""

from __future__ import annotations

import torch
from vlforge_plugins.flamingo.lm import FlamingoLM


@torch.no_grad()
def greedy_generate(
    fusion: FlamingoLM,
    media: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
) -> list[list[int]]:
    """Left-padded prompts (B,L) and their media (B,T,n,d_v) -> each row's new ids, stop token excluded."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens from 0
    out = fusion(input_ids, attention_mask, media, position_ids=position_ids, use_cache=True)
    images_seen = out.text_time[:, -1]  # (B,)
    next_position = position_ids[:, -1:] + 1  # (B,1)
    stops = torch.tensor(stop_ids, device=input_ids.device)
    finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    steps: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B,V)
        logits[:, fusion.image_token_id] = -torch.inf  # an image placeholder has no image behind it
        token = logits.argmax(dim=-1)  # (B,)
        steps.append(token)
        finished |= torch.isin(token, stops)
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
        out = fusion(
            token[:, None],
            attention_mask,
            media,
            image_offset=images_seen,
            position_ids=next_position,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_position = next_position + 1
    generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in input_ids]
    return [_until_stop(row, set(stop_ids)) for row in generated]


def _until_stop(row: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[:i]
    return row
