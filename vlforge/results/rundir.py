"""The run directory: what one run writes, through fsspec, so that many runs can write at once.

Layout of ``<root>/<experiment>/<run_id>/`` (see docs/results.md)::

    recipe.toml        the resolved recipe, as text
    config.json        the resolved recipe, as nested JSON
    env.json           git commit, package versions, hosts, Slurm variables, command line (latest attempt)
    status.json        status, heartbeat, last step, attempts; rewritten atomically
    metrics/*.jsonl    {"step", "name", "value", "time"} rows, one immutable chunk per flush, named
                       <first step>-<last step>-<uuid8>.jsonl
    evals/*.jsonl      {"step", "evaluator", "dataset", "metric", "value", "time"} rows, likewise
    checkpoints/       written by the engine (``step_00000100.pt``); only listed here
    run.lock           held by the live writer (pid, host, heartbeat): one attempt at a time

Every file is written whole under a temporary name and then renamed, so a reader (the indexer) sees
either the previous version or the new one, never half a file, and object stores (which cannot
append) work like local disks. Chunks are never modified after they appear: a killed writer leaves
everything up to its last flush readable, and the indexer can ingest chunks incrementally.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import json
import math
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlforge.errors import UserError
from vlforge.results.diskfull import DiskFullError, disk_full_message, is_disk_full
from vlforge.results.locks import FileLock, LockHeldError, describe

Status = Literal["running", "completed", "failed", "interrupted", "preempted"]
STATUSES: tuple[str, ...] = ("running", "completed", "failed", "interrupted", "preempted")

RUNS_ENV = "VLFORGE_RUNS"
_PACKAGES = ("torch", "timm", "transformers", "pluggy", "pydantic", "duckdb", "fsspec", "vlforge")
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_PARTITION",
    "SLURM_JOB_ACCOUNT",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "SLURM_RESTART_COUNT",
)
TMP_SUFFIX = ".tmp"  # readers skip names ending in this: they are files being written
RUN_LOCK = "run.lock"
# A run lock whose holder (on another host) has not beaten for this long is taken over; the
# writer beats at every status write, at least every few minutes while it trains.
RUN_LOCK_STALE_S = 600.0


class RunLockedError(UserError):
    """Another live process is writing this run (a second ``--resume`` of it, for instance)."""


def resolve_root(cli_value: str | None = None) -> str:
    """The runs root: ``--runs-root`` if given, else ``$VLFORGE_RUNS``, else ``<cwd>/runs``."""
    if cli_value:
        return cli_value
    if os.environ.get(RUNS_ENV):
        return os.environ[RUNS_ENV]
    return str(Path.cwd() / "runs")


def new_run_id() -> str:
    """``<UTC yyyymmdd-HHMMSS>-<6 hex>``: sorts by start time, unique without coordination."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def url_join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        fs.pipe_file(tmp, data)
    except OSError as e:
        # A part written on a full disk holds space that the final status write needs.
        if fs.exists(tmp):
            fs.rm_file(tmp)
        raise OSError(e.errno, e.strerror, path) from e
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, path)  # atomic on POSIX, also when ``path`` exists
    else:
        fs.mv(tmp, path)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path))


def take_run_lock(run_dir: str, *, check_only: bool = False) -> FileLock:
    """Take ``<run_dir>/run.lock`` (``check_only``: and give it back at once, to refuse early).

    Raises :class:`RunLockedError` while a live process holds it.
    """
    fs, path = fsspec.core.url_to_fs(run_dir)
    lock = FileLock(fs, url_join(path, RUN_LOCK), stale_after=RUN_LOCK_STALE_S)
    try:
        lock.acquire(timeout=0)
    except LockHeldError as e:
        raise RunLockedError(
            f"run {path.rstrip('/').rsplit('/', 1)[-1]} is already being trained ({describe(e.holder)}): "
            f"a second attempt would write into the same directory {run_dir}. Wait for it to end or stop "
            f"it; its lock {lock.path} is taken over once that process is gone (or, on another host, "
            f"has not beaten for {RUN_LOCK_STALE_S:.0f} s)."
        ) from None
    if check_only:
        lock.release()
    return lock


class RunWriter:
    """Writes one run's directory. Use from one process (rank 0); not thread-safe.

    Metric and eval rows are buffered and written as a new chunk file every ``flush_every`` rows or
    ``flush_seconds`` seconds (checked when rows are logged), on :meth:`flush` and on :meth:`close`.
    Each flush also refreshes the heartbeat; call :meth:`heartbeat` during long stretches without
    logging (a run whose heartbeat is older than the indexer's threshold shows as ``stale``).
    """

    # status.json is rewritten by heartbeat() at most this often: the stale threshold is minutes,
    # and on an object store every rewrite is a request.
    heartbeat_every: float = 10.0

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        status: dict[str, Any],
        *,
        flush_every: int = 1000,
        flush_seconds: float = 30.0,
        lock: FileLock | None = None,
    ) -> None:
        """Use :meth:`create` or :meth:`open`; ``path`` is the run directory within ``fs``, ``lock``
        its run lock, held (None: a writer that adds to a run without owning it, as ``vlforge
        eval`` into a run does; it never touches the lock a trainer may hold)."""
        self._fs = fs
        self._path = path
        self.run_dir = to_url(fs, path)  # what to show and pass around: keeps the protocol
        self._status = status
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._metrics: list[dict[str, Any]] = []
        self._evals: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._last_status_write = -math.inf
        self._closed = False
        self._lock = lock
        # Trackers mirroring what this writer writes (vlforge.sinks.fanout.SinkSet), if any.
        self.sinks: Any = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str,
        experiment: str,
        run_id: str | None = None,
        *,
        recipe_name: str,
        recipe_toml: str,
        config: dict[str, Any],
        world_size: int = 1,
        parent_run_id: str | None = None,
        hosts: list[str] | None = None,
        flush_every: int = 1000,
        flush_seconds: float = 30.0,
    ) -> RunWriter:
        """Start a new run under ``<root>/<experiment>/<run_id>/`` (the id is generated if not given)."""
        if not experiment or "/" in experiment or experiment.startswith("."):
            raise ValueError(f"experiment name {experiment!r} must be one non-empty path segment")
        run_id = run_id or new_run_id()
        fs, root_path = fsspec.core.url_to_fs(root)
        path = url_join(root_path, experiment, run_id)
        if fs.exists(url_join(path, "status.json")):
            raise FileExistsError(
                f"run directory {path} already holds a run; use RunWriter.open to resume it"
            )
        fs.makedirs(path, exist_ok=True)
        hosts = hosts or [socket.gethostname()]
        now = utc_now()
        status = {
            "run_id": run_id,
            "experiment": experiment,
            "recipe_name": recipe_name,
            "status": "running",
            "reason": None,
            "start_time": now,
            "end_time": None,
            "last_step": None,
            "heartbeat": now,
            "slurm_job_ids": [],
            "parent_run_id": parent_run_id,
            "world_size": world_size,
            "hosts": hosts,
            "attempts": [],
        }
        lock = take_run_lock(to_url(fs, path))
        writer = cls(fs, path, status, flush_every=flush_every, flush_seconds=flush_seconds, lock=lock)
        writer._write("recipe.toml", recipe_toml.encode())
        writer._write("config.json", _dumps(config, indent=2))
        writer._start_attempt(world_size, hosts)
        return writer

    @classmethod
    def open(
        cls,
        run_dir: str,
        *,
        world_size: int | None = None,
        hosts: list[str] | None = None,
        flush_every: int = 1000,
        flush_seconds: float = 30.0,
    ) -> RunWriter:
        """Resume an existing run (after a requeue or a crash): same id and directory, new chunks.

        Earlier chunks stay as they are; the status goes back to ``running`` and a new attempt is
        recorded in ``status.json["attempts"]``.
        """
        fs, path = fsspec.core.url_to_fs(run_dir)
        lock = take_run_lock(run_dir)  # before anything is read or written: a second attempt changes nothing
        status = read_json(fs, url_join(path, "status.json"))
        writer = cls(fs, path, status, flush_every=flush_every, flush_seconds=flush_seconds, lock=lock)
        status.update(status="running", reason=None, end_time=None)
        hosts = hosts or [socket.gethostname()]
        world_size = world_size or status["world_size"]
        status.update(world_size=world_size, hosts=hosts)
        writer._start_attempt(world_size, hosts)
        return writer

    def _start_attempt(self, world_size: int, hosts: list[str]) -> None:
        job_id = slurm_job_id()
        if job_id and job_id not in self._status["slurm_job_ids"]:
            # `scontrol requeue` keeps the job id, so a requeued job is listed once.
            self._status["slurm_job_ids"].append(job_id)
        self._status["attempts"].append(
            {"start_time": utc_now(), "slurm_job_id": job_id, "hosts": hosts, "world_size": world_size}
        )
        self._write("env.json", _dumps(collect_env(world_size, hosts), indent=2))
        self._write_status()

    # -- properties ---------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self._status["run_id"]

    @property
    def experiment(self) -> str:
        return self._status["experiment"]

    @property
    def status(self) -> dict[str, Any]:
        """A copy of what ``status.json`` holds (as of the last write)."""
        return json.loads(json.dumps(self._status))

    # -- logging ------------------------------------------------------------------------------

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Buffer one value per metric name at ``step``; may flush (see the class docs)."""
        now = time.time()
        for name, value in metrics.items():
            self._metrics.append({"step": int(step), "name": name, "value": float(value), "time": now})
        self._status["last_step"] = max(int(step), self._status["last_step"] or 0)
        self._maybe_flush()

    def log_eval(self, step: int, evaluator: str, metrics: dict[str, float], dataset: str = "") -> None:
        """Record an evaluator's results at ``step``. Written at once: evals are rare and costly."""
        now = time.time()
        for metric, value in metrics.items():
            row = {"step": int(step), "evaluator": evaluator, "dataset": dataset}
            self._evals.append(row | {"metric": metric, "value": float(value), "time": now})
        self.flush()

    def heartbeat(self, step: int | None = None) -> None:
        """Say the run is alive (and at ``step``): rewrites ``status.json`` if the last write is
        older than ``heartbeat_every`` seconds."""
        if step is not None:
            self._status["last_step"] = int(step)
        if time.monotonic() - self._last_status_write >= self.heartbeat_every:
            self._write_status()

    def set_status(self, status: Status, reason: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        self._status.update(status=status, reason=reason)
        if status != "running":
            self._status["end_time"] = utc_now()
            self._status["attempts"][-1].update(end_time=self._status["end_time"], status=status)
        self._write_status()

    def flush(self) -> None:
        """Write buffered rows as new chunk files, then the heartbeat."""
        self._write_chunk("metrics", self._metrics)
        self._write_chunk("evals", self._evals)
        if self.sinks is not None:
            self.sinks.send(self._metrics, self._evals)
        self._metrics, self._evals = [], []
        self._last_flush = time.monotonic()
        self._write_status()

    def close(self, status: Status = "completed", reason: str | None = None) -> None:
        """Flush and record the final status, then release the run lock. Closing twice is a no-op.

        If the last rows cannot be written (a full disk), the status still says so: ``failed``
        with the reason; that error is raised only when the run was otherwise ``completed``.
        """
        if self._closed:
            return
        try:
            self.flush()
            lost = None
        except OSError as e:
            lost = e
        if lost is not None:
            cause = (
                f"disk full: {disk_full_message(lost, self.run_dir)}"
                if is_disk_full(lost)
                else f"{type(lost).__name__}: {lost}"
            )
            raise_lost = status == "completed"
            status, reason = "failed", reason or cause
        self.set_status(status, reason)
        self._closed = True
        if self._lock is not None:
            self._lock.release()
        if self.sinks is not None:
            self.sinks.close(status)
        if lost is not None and raise_lost:
            raise (DiskFullError(cause) if is_disk_full(lost) else lost) from lost

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close("completed")
        elif isinstance(exc, KeyboardInterrupt):
            self.close("interrupted", "KeyboardInterrupt")
        else:
            self.close("failed", f"{type(exc).__name__}: {exc}")

    # -- files --------------------------------------------------------------------------------

    def _maybe_flush(self) -> None:
        if (
            len(self._metrics) >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def _write_chunk(self, kind: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        # One row per key (the last logged), and the step range in the name: the indexer can then
        # insert a chunk whose range meets no other chunk of the run without deduplicating it. The
        # uuid keeps names unique when a requeued run logs the same steps again.
        key = [k for k in rows[0] if k not in ("value", "time")]
        rows = list({tuple(row[k] for k in key): row for row in rows}.values())
        steps = [row["step"] for row in rows]
        name = f"{min(steps):012d}-{max(steps):012d}-{uuid.uuid4().hex[:8]}.jsonl"
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        self._fs.makedirs(url_join(self._path, kind), exist_ok=True)
        self._write(f"{kind}/{name}", data)

    def _write_status(self) -> None:
        self._last_status_write = time.monotonic()
        self._status["heartbeat"] = utc_now()
        data = _dumps(self._status, indent=2)
        try:
            self._write("status.json", data)
        except OSError as e:
            if not (is_disk_full(e) and isinstance(self._fs, LocalFileSystem)):
                raise
            # No room for a new file: rewrite the old one in the blocks it already has, so that the
            # status still says how the run ended (not atomic, but better than a stale "running").
            with open(url_join(self._path, "status.json"), "r+b") as f:
                f.write(data)
                f.truncate()
        if self._lock is not None and not self._closed:
            with contextlib.suppress(OSError):  # a missed beat only delays a take-over
                self._lock.beat()

    def _write(self, relpath: str, data: bytes) -> None:
        write_atomic(self._fs, url_join(self._path, relpath), data)


# -- environment ------------------------------------------------------------------------------


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``; None outside Slurm."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def collect_env(world_size: int, hosts: list[str]) -> dict[str, Any]:
    """What ``env.json`` holds. Package versions come from metadata: importing torch costs seconds."""
    return {
        "time": utc_now(),
        "git": git_info(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "hosts": hosts,
        "user": _user(),
        "world_size": world_size,
        "slurm": {k: os.environ[k] for k in _SLURM_VARS if k in os.environ},
        "command": sys.argv,
        "cwd": os.getcwd(),
    }


def git_info(cwd: str | None = None) -> dict[str, Any] | None:
    """Commit and dirtiness of the git checkout around ``cwd``; None outside one (or without git)."""
    try:
        commit = _git(["rev-parse", "HEAD"], cwd)
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], cwd))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(args: list[str], cwd: str | None) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        return None


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Local paths stay plain paths; other filesystems keep their protocol (``memory://...``)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _dumps(obj: Any, indent: int | None = None) -> bytes:
    return json.dumps(obj, indent=indent, default=_json_default).encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
