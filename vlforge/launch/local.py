"""The local launcher: one process in place, or ``nproc`` ranks on this machine.

Ranks are started with ``torch.multiprocessing`` (spawn) and rendezvous over
TCP on 127.0.0.1 at a free port, like torchrun's static rendezvous: gloo on
CPU, NCCL on GPUs (one GPU per rank).
"""

from __future__ import annotations

import os
import socket
import sys

from vlforge.errors import RunFailed, UserError
from vlforge.launch.worker import RunJob, run_job

FAILURE_GRACE_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_rank_environment(local_rank: int, world_size: int, port: int) -> None:
    """The variables ``init_process_group`` reads, for rank ``local_rank`` of a run on this machine."""
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _spawned_rank(local_rank: int, job: RunJob, world_size: int, port: int) -> None:
    set_rank_environment(local_rank, world_size, port)
    try:
        run_job(job)  # the status is read back from the run directory by the parent
    except UserError as exc:
        # As one process would say it (a second resume refused by the run lock, for instance):
        # spawn passes only a traceback to the parent, so the rank prints it and exits with its code.
        print(f"vlforge: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


def launch_local(job: RunJob, nproc: int) -> str:
    """Run ``job`` on ``nproc`` local ranks; returns the run status as rank 0 saw it."""
    if nproc == 1:
        os.environ.setdefault("WORLD_SIZE", "1")
        return run_job(job)
    import torch.multiprocessing as mp

    try:
        ranks = mp.spawn(_spawned_rank, args=(job, nproc, free_port()), nprocs=nproc, join=False)
        # When a rank fails the others stop by themselves within seconds (they are told through
        # the store); the grace period lets rank 0 close the run with the error before any kill.
        while not ranks.join(grace_period=FAILURE_GRACE_S):
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        if isinstance(exc, mp.ProcessExitedException) and exc.exit_code == UserError.exit_code:
            raise UserError(f"run {job.run_id}: rank {exc.error_index} stopped on the error above") from None
        status = _status_of(job)
        reason = status.get("reason") or str(exc)
        raise RunFailed(f"run {job.run_id} failed on a rank: {reason}") from exc
    return _status_of(job)["status"]


def _status_of(job: RunJob) -> dict:
    import fsspec

    from vlforge.results.rundir import read_json

    fs, path = fsspec.core.url_to_fs(job.run_dir)
    return read_json(fs, f"{path}/status.json") if fs.exists(f"{path}/status.json") else {}
