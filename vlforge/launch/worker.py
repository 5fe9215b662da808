"""What every rank runs, whichever launcher started it.

A ``RunJob`` is small and picklable: each rank re-reads the recipe itself
(plugins are process-local), joins the process group from its environment,
trains, and rank 0 closes the run directory and refreshes the index. Rank 0 also keeps the
run's ``log.txt`` and starts its sinks (trackers).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

from vlforge.eval.target import EvalTarget

EXIT_CODES = {"completed": 0, "failed": 1, "preempted": 3, "interrupted": 130}
# Rank 0 writes buffered metrics at the first log step this long after the last write: a log
# interval's rows reach the run directory (and so `vlforge query`) within about one interval.
LIVE_FLUSH_S = 1.0


@dataclass(frozen=True)
class RunJob:
    recipe_path: str  # the user's recipe, or the run directory's recipe.toml when resuming
    overrides: tuple[str, ...]
    root: str  # runs root (any fsspec URL)
    experiment: str
    run_id: str
    resume: bool = False
    extra_plugins: tuple[str, ...] = ()
    # `vlforge eval`: evaluate this checkpoint instead of training (vlforge.eval.runner).
    evaluate: EvalTarget | None = None

    @property
    def run_dir(self) -> str:
        return f"{self.root.rstrip('/')}/{self.experiment}/{self.run_id}"


def init_process_group(timeout_s: int = 1800) -> None:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, if any.

    On GPUs the group is ``cuda:nccl,cpu:gloo``: NCCL for tensors, gloo for object
    collectives and barriers. A collective that waits longer than ``timeout_s``
    (``launch.collective_timeout_s``) fails the run instead of hanging it.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from vlforge import distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=distributed.process_group_backend(cuda), timeout=timedelta(seconds=timeout_s)
    )
    if distributed.guard_requested():
        distributed.install_collective_guard()
    distributed.watch_peer_failures()


def run_job(job: RunJob) -> str:
    """Train ``job`` on this rank; returns the run status."""
    from vlforge import checkpoint as ckpt
    from vlforge import distributed as dist
    from vlforge.engine import Trainer
    from vlforge.recipe import load_recipe
    from vlforge.results.diskfull import DiskFullError, disk_full_message, is_disk_full
    from vlforge.runlog import RunLog, progress_line

    recipe, plugins = load_recipe(job.recipe_path, job.overrides, job.extra_plugins)
    init_process_group(recipe.launch.collective_timeout_s)
    if job.evaluate is not None:
        from vlforge.eval.runner import run_evaluation

        status = run_evaluation(job, job.evaluate, recipe, plugins)
        dist.leave_group()
        return status
    run = _open_run(job, recipe, plugins) if dist.rank() == 0 else None
    status, reason, failed = "failed", None, False
    with RunLog(job.run_dir) if run is not None else nullcontext():
        try:
            trainer = Trainer(recipe, plugins, job.run_dir, run)
            latest = ckpt.resume_checkpoint(job.run_dir) if job.resume else None  # the newest intact
            if latest:
                trainer.restore(latest)
            status = trainer.fit()
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            peer = dist.peer_failure()  # a collective broken by another rank's failure: name that one
            if peer is not None and not peer.startswith(f"rank {dist.rank()}:"):
                reason = f"{peer} (this rank then failed with {reason})"
            else:
                dist.announce_failure(reason)
            failed = True
            if is_disk_full(exc):  # one message naming the disk and the path, no traceback
                reason = f"disk full: {disk_full_message(exc, job.run_dir)}"
                resume = f"vlforge run RECIPE --resume {job.run_id}"
                raise DiskFullError(f"{reason}; free space there, then continue with `{resume}`") from exc
            raise
        finally:
            if run is not None:
                # The status line first: `vlforge logs -f` stops once status.json says the run ended.
                progress_line(
                    f"vlforge: run {job.run_id} {status}" + (f" ({reason})" if reason else ""), False
                )
                run.close(status, reason)
                _refresh_index(job.root)
            if not failed:  # after a failure, peers may never join a teardown
                dist.leave_group()
    return status


def _open_run(job: RunJob, recipe, plugins):
    """Rank 0's RunWriter with the recipe's sinks (trackers) attached."""
    from vlforge.sinks.fanout import open_sinks

    run = _open_writer(job, recipe)
    run.sinks = open_sinks(recipe, plugins, run)
    return run


def _open_writer(job: RunJob, recipe, extra_config: dict | None = None):
    """The run reopened when resuming, else created (its config plus ``extra_config``)."""
    import fsspec

    from vlforge.results.rundir import RunWriter

    # A requeued Slurm job resumes, but its first attempt may have died before the run
    # directory had a status: then this attempt is the run's first.
    fs, path = fsspec.core.url_to_fs(job.run_dir)
    if job.resume and fs.exists(f"{path}/status.json"):
        return RunWriter.open(
            job.run_dir, world_size=int(os.environ.get("WORLD_SIZE", "1")), flush_seconds=LIVE_FLUSH_S
        )
    return RunWriter.create(
        job.root,
        job.experiment,
        job.run_id,
        recipe_name=recipe.name,
        recipe_toml=recipe.to_toml(),
        config=recipe.resolved() | (extra_config or {}),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        flush_seconds=LIVE_FLUSH_S,
    )


def _refresh_index(root: str) -> None:
    """Ingest the finished run; the run's files stay the truth if this fails."""
    from vlforge.results.index import build_index

    try:
        build_index(root)
    except Exception as exc:  # a held lock or a full disk must not fail a finished run
        print(f"vlforge: the run is saved, but indexing {root} failed ({exc}); run `vlforge index` later")
