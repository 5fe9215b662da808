"""torch.distributed helpers that are the identity in a single process.

Two gathers with different semantics (methods.md §1.2):

* ``gather_with_grad``: backward sums each rank's gradient into every slice.
  Use only with a *local* loss (each rank's loss covers its own rows).
* ``gather_no_grad``: plain all_gather with no autograd history (queue
  enqueue, metrics).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world*n, ...) in rank order, gradients flowing back to every rank."""
    if world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world*n, ...) in rank order, detached."""
    if world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, indexed by rank (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the GPU under NCCL, the CPU under gloo."""
    uses_nccl = "nccl" in str(dist.get_backend()).lower()
    return torch.device("cuda", torch.cuda.current_device()) if uses_nccl else torch.device("cpu")


@torch.no_grad()
def all_gather_varied(x: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's (n_r, *dims_r) tensor -> (sum n_r, *largest dims) on every rank, in rank order.

    Ranks may hold different row counts and trailing sizes (captions padded to their own
    longest): each is zero-padded to the largest, gathered, and its padding rows cut. A rank
    with nothing to contribute passes None. The result is on x's device (the CPU for None);
    None only when every rank passed None.
    """
    if world_size() == 1:
        return None if x is None else x.detach()
    layouts = all_gather_object(None if x is None else (tuple(x.shape), x.dtype))
    present = [layout for layout in layouts if layout is not None]
    if not present:
        return None
    ndim, dtype = len(present[0][0]), present[0][1]
    largest = [max(shape[i] for shape, _ in present) for i in range(ndim)]
    device = _collective_device()
    padded = torch.zeros(largest, dtype=dtype, device=device)
    if x is not None:
        padded[tuple(slice(0, n) for n in x.shape)] = x.detach().to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    rows = [layout[0][0] if layout is not None else 0 for layout in layouts]
    result = torch.cat([part[:n] for part, n in zip(parts, rows)])
    return result.to(x.device if x is not None else "cpu")
