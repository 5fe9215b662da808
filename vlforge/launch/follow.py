"""`vlforge logs RUN [-f]` and `vlforge run --launcher slurm --follow`: show a run's log.txt.

Following reads the run directory only (``log.txt`` from where it left off, ``status.json`` for
the status), so it works for any launcher and any fsspec store. It stops when the run has ended:
its status is completed, failed or interrupted, or preempted while its Slurm job (if it has one)
is neither pending nor running any more, since a requeued job continues the same log. While a
submitted job has not started yet, it says so whenever the Slurm state changes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import TextIO

import fsspec

from vlforge.results.rundir import read_json, url_join
from vlforge.runlog import LOG_NAME

ENDED = {"completed", "failed", "interrupted"}
SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING", "RESIZING"}


def follow_run(
    run_dir: str,
    *,
    follow: bool = True,
    job_id: str | None = None,
    poll_s: float = 1.0,
    out: TextIO | None = None,
) -> str | None:
    """Print ``run_dir``'s log; with ``follow``, new lines until the run ends. Returns its status."""
    out = out or sys.stdout
    fs, path = fsspec.core.url_to_fs(run_dir)
    log, status_file = url_join(path, LOG_NAME), url_join(path, "status.json")
    offset, said = 0, None
    while True:
        status = read_json(fs, status_file).get("status") if fs.exists(status_file) else None
        offset = _print_new(fs, log, offset, out)
        if not follow or status in ENDED:
            return status
        job = job_id or _job_of(fs, status_file)
        state = _slurm_state(job)
        alive = state in SLURM_ALIVE
        if status == "preempted" and not alive:  # not requeued (or not on Slurm): it has ended
            return status
        if status is None and state is not None and not alive:
            out.write(f"vlforge: Slurm job {job} is {state} and its run never started\n")
            return None
        if status is None and state != said:
            out.write(f"vlforge: waiting for Slurm job {job} ({state or 'state unknown'})\n")
            said = state
        out.flush()
        time.sleep(poll_s)


def _print_new(fs: fsspec.AbstractFileSystem, log: str, offset: int, out: TextIO) -> int:
    """Write what the log holds past ``offset`` (whole lines only); returns the new offset."""
    if not fs.exists(log):
        return offset
    size = fs.size(log)
    if size <= offset:
        return offset
    data = fs.cat_file(log, start=offset, end=size)
    data = data[: data.rfind(b"\n") + 1]  # a line being written is shown once complete
    out.write(data.decode(errors="replace"))
    out.flush()
    return offset + len(data)


def _job_of(fs: fsspec.AbstractFileSystem, status_file: str) -> str | None:
    if not fs.exists(status_file):
        return None
    ids = read_json(fs, status_file).get("slurm_job_ids") or []
    return ids[-1] if ids else None


def _slurm_state(job_id: str | None) -> str | None:
    """The job's Slurm state (UNKNOWN once slurmctld forgot it), None without a job or Slurm."""
    if not job_id:
        return None
    from vlforge.launch.slurm import job_state

    try:
        state = job_state(job_id)
    except (OSError, subprocess.SubprocessError):
        return None
    return state
