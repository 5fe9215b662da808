"""FLIP's random patch masking (``flip.random``) and the step-seeded generator it draws from.

Masking runs between the vision encoder's ``embed`` (patches + position
embeddings, prefix tokens prepended) and its ``blocks``: every image keeps its
prefix (CLS) tokens and a uniform random subset of K of its N patch tokens.
Because position embeddings are already added, kept tokens keep their
location and nothing needs unshuffling (FLIP has no decoder).

Randomness: one ``torch.Generator`` per stream, reseeded at the start of every
optimizer step from (recipe seed, stream, rank, step). A resumed run draws
exactly the masks of an uninterrupted one, and the checkpoint stores nothing.

Shapes: B batch, P prefix tokens, N patch tokens, K kept patch tokens, D width.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge.engine import TrainState
    from vlforge.model import Progress


@cache
def keep_count(num_tokens: int, ratio: float) -> int:
    """K = max(1, ⌊N·(1 − ratio)⌋) in exact arithmetic.

    ``ratio`` is read as the decimal it is written as (``Fraction(str(ratio))``),
    so N = 100, ratio = 0.9 keeps 10 tokens; float arithmetic would keep 9
    because 1 − 0.9 = 0.0999… At least one token is always kept.
    """
    return max(1, math.floor(num_tokens * (1 - Fraction(str(ratio)))))


def step_seed(seed: int, stream: str, rank: int, step: int) -> int:
    """A 64-bit seed that is a pure function of its arguments (the same on any machine)."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class StepGenerator:
    """A ``torch.Generator`` on the tokens' device, reseeded per (rank, optimizer step).

    Within a step the draws of successive micro-batches follow one another;
    the next step starts from a fresh seed, so the masks of step s depend only
    on (seed, stream, rank, s): exact resume without checkpointed RNG state.
    """

    def __init__(self, seed: int, stream: str, rank: int = 0) -> None:
        self.seed = seed
        self.stream = stream
        self._current_seed = step_seed(seed, stream, rank, 0)
        self._generator: torch.Generator | None = None  # made on first use, on the tokens' device

    def reseed(self, rank: int, step: int) -> None:
        self._current_seed = step_seed(self.seed, self.stream, rank, step)
        if self._generator is not None:
            self._generator.manual_seed(self._current_seed)

    def uniform(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """U[0, 1) noise of ``shape`` drawn on ``device`` (no host-device copy, no sync)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device).manual_seed(self._current_seed)
        return torch.rand(shape, generator=self._generator, device=device)


def lowest_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, N) scores -> (B, K) indices of each row's ``keep`` lowest scores, in ascending index order.

    With i.i.d. uniform scores this is a uniform random K-subset per row,
    without replacement; ascending order makes the output depend on the subset only.
    """
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


class RandomMasking(nn.Module):
    """``flip.random``: keep a uniform random K-subset of patch tokens per image, in training only.

    ``ratio`` is the configured masking ratio; ``active_ratio`` the one applied,
    set at every step start: 0 from ``unmasked_from_step`` (or
    ``unmasked_from_samples``) on, FLIP's unmasked tuning inside one run.
    """

    def __init__(
        self,
        ratio: float,
        generator: StepGenerator,
        unmasked_from_step: int | None = None,
        unmasked_from_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.ratio = ratio
        self.active_ratio = ratio
        self.generator = generator
        self.unmasked_from_step = unmasked_from_step
        self.unmasked_from_samples = unmasked_from_samples

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, active_ratio={self.active_ratio}"

    def ratio_at(self, progress: Progress) -> float:
        """The ratio for the step about to run: ``ratio``, or 0 once unmasked tuning has begun."""
        by_step = self.unmasked_from_step is not None and progress.step >= self.unmasked_from_step
        by_samples = (
            self.unmasked_from_samples is not None and progress.samples_seen >= self.unmasked_from_samples
        )
        return 0.0 if by_step or by_samples else self.ratio

    def forward(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """(B, P+N, D) -> (B, P+K, D) in training; the input itself in eval mode or at ratio 0."""
        if not self.training or self.active_ratio == 0:
            return tokens
        prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
        batch, count, width = patches.shape
        noise = self.generator.uniform((batch, count), tokens.device)  # (B, N)
        keep = lowest_indices(noise, keep_count(count, self.active_ratio))  # (B, K)
        kept = patches.gather(1, keep[..., None].expand(-1, -1, width))  # (B, K, D)
        return torch.cat([prefix, kept], dim=1)

    @hookimpl
    def vlforge_step_start(self, state: TrainState) -> None:
        self.active_ratio = self.ratio_at(state.progress)
        self.generator.reseed(state.rank, state.step)

    @hookimpl
    def vlforge_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        metrics["flip/mask_ratio"] = self.active_ratio
