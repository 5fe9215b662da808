"""torch.distributed helpers that are the identity in a single process.

Every collective vlforge issues goes through this module. Tensor collectives
move their input to the process group's collective device (the current CUDA
device when the group has NCCL, else the CPU), check that the group has a
backend for that device, and hand the result back on the input's device: an
NCCL group has no CPU backend, and a CPU tensor sent to it fails the run at its
first collective ("No backend type associated with device type cpu"). Object
collectives and barriers use the group's CPU backend (gloo), which is why the
group is created as ``cuda:nccl,cpu:gloo`` on GPUs (``process_group_backend``).

``install_collective_guard`` (on when ``VLFORGE_CHECK_COLLECTIVES=1``) makes a
collective called from outside torch (vlforge, plugins) that bypasses this module raise,
so tests on gloo catch what would only fail under NCCL.

Two gathers with different semantics (methods.md §1.2):

* ``gather_with_grad``: backward sums each rank's gradient into every slice.
  Use only with a *local* loss (each rank's loss covers its own rows).
* ``gather_no_grad``: plain all_gather with no autograd history (queue
  enqueue, metrics).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

GUARD_ENV = "VLFORGE_CHECK_COLLECTIVES"
# torch.distributed functions the guard watches (the ones vlforge code could call directly).
GUARDED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
)


class CollectiveDeviceError(RuntimeError):
    """A collective got a tensor on a device its process group has no backend for, or bypassed this module."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


# --------------------------------------------------------------------------- backends and devices


def process_group_backend(cuda: bool) -> str:
    """The ``init_process_group`` backend: NCCL for CUDA tensors, gloo for CPU ones (objects, barriers)."""
    return "cuda:nccl,cpu:gloo" if cuda else "gloo"


@functools.cache  # every collective asks (twice): parse each group's string once
def backend_devices(config: str) -> dict[str, str]:
    """``'cuda:nccl,cpu:gloo'`` -> {'cuda': 'nccl', 'cpu': 'gloo'}; a bare ``'nccl'`` serves CUDA only.

    Callers must not change the returned dict (it is cached)."""
    served: dict[str, str] = {}
    for entry in config.lower().split(","):
        device, _, backend = entry.strip().rpartition(":")
        if device:
            served[device] = backend
        elif backend == "nccl":
            served["cuda"] = backend
        else:  # gloo (and mpi) take CPU and CUDA tensors
            served |= {"cpu": backend, "cuda": backend}
    return served


def collective_device(config: str | None = None) -> torch.device:
    """Where tensor collectives run: the current CUDA device when NCCL serves CUDA, else the CPU."""
    config = config or dist.get_backend_config()
    if backend_devices(config).get("cuda") == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_placement(tensor: torch.Tensor, config: str | None = None) -> None:
    """Raise unless the process group has a backend for ``tensor``'s device."""
    config = config or dist.get_backend_config()
    if tensor.device.type not in backend_devices(config):
        raise CollectiveDeviceError(
            f"a collective got a {tensor.device.type} tensor, but the process group '{config}' "
            f"has no backend for device type {tensor.device.type}"
        )


def _placed(x: torch.Tensor, on_host: bool = False) -> torch.Tensor:
    """``x`` on the collective device (the CPU ``on_host``), contiguous, checked against the group."""
    x = x.to(torch.device("cpu") if on_host else collective_device()).contiguous()
    check_placement(x)
    return x


# --------------------------------------------------------------------------- the guard


def _guarded(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def check(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller != __name__ and caller.split(".")[0] != "torch":  # torch's own DDP/FSDP may
            raise CollectiveDeviceError(
                f"{caller} calls torch.distributed.{name} directly; use vlforge.distributed "
                "(it places tensors on the process group's device)"
            )
        return call(*args, **kwargs)

    check.__vlforge_guard__ = True
    return check


def install_collective_guard() -> None:
    """Make direct torch.distributed collectives from code outside torch raise (idempotent)."""
    for name in GUARDED:
        call = getattr(dist, name)
        if not getattr(call, "__vlforge_guard__", False):
            setattr(dist, name, _guarded(name, call))


def guard_requested() -> bool:
    return os.environ.get(GUARD_ENV, "") == "1"


# --------------------------------------------------------------------------- collectives


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world*n, ...) in rank order, gradients flowing back to every rank."""
    if world_size() == 1:
        return x
    # Functional collectives: the backward reduce-scatters (sums) each rank's gradient slice.
    # torch.distributed.nn.functional.all_gather and all_gather_tensor_autograd, which did the
    # same, are deprecated.
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    check_placement(x)  # autograd needs x where it is; the model's device is the collective device
    return wait_tensor(all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD))


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world*n, ...) in rank order, detached."""
    if world_size() == 1:
        return x.detach()
    placed = _placed(x.detach())
    parts = [torch.empty_like(placed) for _ in range(world_size())]
    dist.all_gather(parts, placed)
    return torch.cat(parts, dim=0).to(x.device)


@torch.no_grad()
def all_reduce(x: torch.Tensor, op: str = "sum", on_host: bool = False) -> torch.Tensor:
    """Element-wise ``op`` ("sum", "max", "min") over ranks; a new tensor on ``x``'s device.

    ``on_host``: through the group's CPU backend, for host values (flags) that must not
    wait for the device.
    """
    if world_size() == 1:
        return x.clone()
    placed = _placed(x.clone(), on_host)
    dist.all_reduce(placed, op=getattr(dist.ReduceOp, op.upper()))
    return placed.to(x.device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    return all_reduce(x) / world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def leave_group(wait_for_peers: bool = True) -> None:
    """Destroy the process group (if any); with ``wait_for_peers``, once every rank is here.

    Wait only where every rank got here (after a failure, peers may never come). A rank that
    tears its gloo connections down while a peer still holds them open (rank 0 closing the run
    and refreshing the index, say) can die of SIGABRT, "terminate called without an active
    exception", after a run that succeeded.
    """
    if is_distributed():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, indexed by rank (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


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
    device = collective_device()
    padded = torch.zeros(largest, dtype=dtype, device=device)
    if x is not None:
        padded[tuple(slice(0, n) for n in x.shape)] = x.detach().to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    rows = [layout[0][0] if layout is not None else 0 for layout in layouts]
    result = torch.cat([part[:n] for part, n in zip(parts, rows)])
    return result.to(x.device if x is not None else "cpu")


# --------------------------------------------------------------------------- failures

FAILURE_KEY = "vlforge/failure"
_seen_failure: str | None = None  # what the watcher read before it aborted the group


def _store() -> Any:
    return dist.distributed_c10d._get_default_store()  # the rendezvous store every rank shares


def announce_failure(reason: str) -> None:
    """Tell every rank that this one failed (first failure wins), then leave the group; never raises.

    Aborting closes this rank's connections at once, so peers blocked in a gloo
    collective raise now rather than when this process has finished exiting.
    """
    if not is_distributed():
        return
    with contextlib.suppress(Exception):  # the store's host (rank 0) may be gone already
        _store().compare_set(FAILURE_KEY, "", f"rank {rank()}: {reason}")
    with contextlib.suppress(Exception):
        dist.distributed_c10d._abort_process_group()


def peer_failure() -> str | None:
    """The failure a rank announced (``'rank k: Error: ...'``), or None."""
    if _seen_failure is not None or not is_distributed():
        return _seen_failure
    try:
        store = _store()
        return store.get(FAILURE_KEY).decode() if store.check([FAILURE_KEY]) else None
    except Exception:
        return None


def watch_peer_failures(poll_s: float = 0.5, grace_s: float = 3.0) -> None:
    """Abort this rank's collectives soon after another rank announces a failure.

    A rank blocked in an NCCL collective never learns that a peer died: it waits
    for the collective timeout. A daemon thread polls the store; when a peer has
    failed it gives the main thread ``grace_s`` to fail by itself (gloo raises as
    soon as the peer's sockets close), then aborts the process group so the
    blocked collective raises and the run is closed with the peer's error.
    """
    import threading
    import time

    me = rank()

    def watch() -> None:
        global _seen_failure
        while is_distributed():
            failure = peer_failure()
            if failure is not None and not failure.startswith(f"rank {me}:"):
                _seen_failure = failure
                print(f"vlforge: rank {me} stops: {failure}", file=sys.stderr, flush=True)
                time.sleep(grace_s)
                if is_distributed():
                    dist.distributed_c10d._abort_process_group()
                return
            time.sleep(poll_s)

    threading.Thread(target=watch, name="vlforge-peer-failures", daemon=True).start()
