"""A distributed, resumable sampler over a map-style dataset.

Epoch ``e`` is a permutation of the dataset seeded with ``seed + e``, cut to
a multiple of ``world_size`` (the tail is dropped so every rank takes the
same number of steps) and dealt out as ``permutation[rank::world_size]``.
Since the order depends only on (seed, epoch, rank, world size), a position
``(epoch, index)`` names exactly which samples a rank has left, and resuming
from it neither repeats nor skips one.

Across a change of world size: ranks move in lockstep, so after ``index``
samples per rank the epoch's permutation has been consumed up to
``index * world_size`` exactly. ``rebase`` turns a position into
``dealt_from`` = that global count; the new world deals out
``permutation[dealt_from:]`` as before, so the epoch goes on with no sample
repeated or skipped (docs/data.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Dataset indices for one rank, one epoch at a time, starting at ``start_index``.

    ``start_index`` counts samples of this rank's epoch already consumed. It
    holds for the epoch it was set in: ``set_epoch`` to another epoch starts
    that epoch from its beginning.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        start_index: int = 0,
        dealt_from: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset_size = len(dataset)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.samples_per_rank = self.dataset_size // world_size
        self.epoch = epoch
        self.start_index = start_index
        self.index = start_index  # samples handed out in this epoch so far
        self.dealt_from = dealt_from  # samples of the permutation taken by an earlier world size

    def indices(self) -> list[int]:
        """This rank's whole epoch, in order (before ``start_index`` is applied)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        permutation = torch.randperm(self.dataset_size, generator=generator)[self.dealt_from :]
        kept = permutation[: self._dealt_per_rank() * self.world_size]  # equal counts on every rank
        return kept[self.rank :: self.world_size].tolist()

    def _dealt_per_rank(self) -> int:
        return (self.dataset_size - self.dealt_from) // self.world_size

    def __iter__(self) -> Iterator[int]:
        self.index = self.start_index
        for dataset_index in self.indices()[self.start_index :]:
            self.index += 1
            yield dataset_index

    def __len__(self) -> int:
        return max(self._dealt_per_rank() - self.start_index, 0)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``; a different epoch than the current one starts at its beginning."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.start_index = 0
            self.index = 0
            self.dealt_from = 0

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """The position to resume from: ``{"epoch", "index"}``.

        By default ``index`` counts the indices this sampler has handed out in
        the epoch. A ``DataLoader`` fetches ahead of the training loop, so a
        loop that checkpoints mid-epoch should pass ``consumed``: the samples
        of this epoch it has actually trained on, counted from the epoch's
        start (so including any before a resume).
        """
        index = self.index if consumed is None else consumed
        world = self.world_size
        return {"epoch": self.epoch, "index": index, "dealt_from": self.dealt_from, "world_size": world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["index"]`` of epoch ``state["epoch"]`` on the next iteration.

        A position saved at another world size is rebased first (see the module's docs).
        """
        state = rebase(state, self.world_size)
        self.epoch = int(state["epoch"])
        self.start_index = int(state["index"])
        self.index = self.start_index
        self.dealt_from = int(state.get("dealt_from", 0))


def rebase(state: dict[str, int], world_size: int) -> dict[str, int]:
    """A position of any rank at ``state["world_size"]`` as a position of every rank at ``world_size``."""
    saved_world = int(state.get("world_size", world_size))
    if saved_world == world_size:
        return state
    dealt = int(state.get("dealt_from", 0)) + int(state["index"]) * saved_world
    return {"epoch": int(state["epoch"]), "index": 0, "dealt_from": dealt, "world_size": world_size}
