"""Evaluation on every rank: each rank works on its share of a split, then the shares are gathered.

A split is cut into batches of ``batch_size`` items, as one process would cut
it, and each rank takes a contiguous run of whole batches (rank r: batches
``[r·B/W, (r+1)·B/W)``). Every batch then holds exactly the items it holds in
one process, so each rank computes what one process computes for those
batches (same inputs, same batch shapes), and gathering in rank order gives
back the one-process result in the one-process order. Metrics computed from
the gathered whole are therefore those of one process.

Ranks whose share is one batch short run the split's last batch once more and
drop its result, so that every rank calls the model equally often: a sharded
(FSDP) model gathers its parameters inside each forward, on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from vlforge import distributed as dist


def my_batches(num_items: int, batch_size: int) -> list[tuple[range, bool]]:
    """(item range, keep) of this rank's batches: its contiguous share, then padding not to keep."""
    starts = range(0, num_items, batch_size)
    rank, world = dist.rank(), dist.world_size()
    mine = starts[rank * len(starts) // world : (rank + 1) * len(starts) // world]
    batches = [(range(start, min(start + batch_size, num_items)), True) for start in mine]
    most = -(-len(starts) // world)  # the largest share
    if starts and len(batches) < most:
        batches.append((range(starts[-1], num_items), False))
    return batches


def cat_padded(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """Concatenate (n_i, *dims_i) along rows, zero-padding trailing dims to the largest; None if empty."""
    if not parts:
        return None
    largest = [max(part.shape[d] for part in parts) for d in range(1, parts[0].ndim)]
    padded = []
    for part in parts:
        padding = [p for d in reversed(range(1, part.ndim)) for p in (0, largest[d - 1] - part.shape[d])]
        padded.append(torch.nn.functional.pad(part, padding) if any(padding) else part)
    return torch.cat(padded)


def gather_rows(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """This rank's row blocks -> every rank's, concatenated in rank order (trailing dims padded)."""
    return dist.all_gather_varied(cat_padded(parts))


def gather_list(values: list[Any]) -> list[Any]:
    """This rank's list -> every rank's, concatenated in rank order."""
    return [value for part in dist.all_gather_object(values) for value in part]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
