"""Endless, resumable streams of micro-batches for the training loop.

The engine asks ``make_stream(source, ...)`` for the train stream. A data
source that streams (e.g. WebDataset shards) may provide its own by defining
``train_stream(micro_batch, seed, num_workers, rank, world_size)``; any other
source gets ``BatchStream`` over its map-style ``dataset("train")``.

A stream has ``next() -> batch``, ``state_dict()``/``load_state_dict()`` (the
data position saved in checkpoints, so a resumed run neither repeats nor skips
samples), ``epoch`` and ``batches_per_epoch()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from vlforge import distributed as dist
from vlforge.data.sampler import ResumableSampler, rebase


class TrainStream(Protocol):
    epoch: int

    def next(self) -> dict[str, Any]: ...
    def batches_per_epoch(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_stream(source: Any, micro_batch: int, seed: int, num_workers: int) -> TrainStream:
    """The train stream of ``source`` for this rank."""
    if hasattr(source, "train_stream"):
        return source.train_stream(
            micro_batch=micro_batch,
            seed=seed,
            num_workers=num_workers,
            rank=dist.rank(),
            world_size=dist.world_size(),
        )
    return BatchStream(source.dataset("train"), source.collate, micro_batch, seed, num_workers)


class BatchStream:
    """Endless micro-batches over epochs; its position is (epoch, index in this rank's epoch)."""

    def __init__(self, dataset: Any, collate: Any, micro_batch: int, seed: int, num_workers: int) -> None:
        self.micro_batch = micro_batch
        self.seed = seed
        self.sampler = ResumableSampler(dataset, rank=dist.rank(), world_size=dist.world_size(), seed=seed)
        # The loader's own generator: creating an iterator must not draw from the global RNG,
        # or a resumed run (which creates one mid-epoch) would drift from the uninterrupted one.
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=micro_batch,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=num_workers,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            generator=self.generator,
        )
        self.epoch, self.index = 0, 0
        self.dealt_from = 0  # of this epoch's permutation, by an earlier world size (a resume)
        self._iterator: Iterator[Any] | None = None

    def batches_per_epoch(self) -> int:
        return self.sampler.samples_per_rank // self.micro_batch

    def next(self) -> dict[str, Any]:
        if self._iterator is None:
            self.sampler.load_state_dict(self.state_dict())
            self.generator.manual_seed(hash((self.seed, dist.rank(), self.epoch)) % 2**63)
            self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.index, self.dealt_from = self.epoch + 1, 0, 0
            self._iterator = None
            return self.next()
        self.index += self.micro_batch
        return batch

    def state_dict(self) -> dict[str, int]:
        world = self.sampler.world_size
        return {"epoch": self.epoch, "index": self.index, "dealt_from": self.dealt_from, "world_size": world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``; one saved at another world size continues the same epoch order."""
        state = rebase(state, self.sampler.world_size)
        self.epoch, self.index, self.dealt_from = state["epoch"], state["index"], state.get("dealt_from", 0)
        self._iterator = None
