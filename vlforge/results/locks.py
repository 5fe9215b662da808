"""Lock files with a holder record and a heartbeat: the index lock and the run lock.

A lock is a small JSON file ``{"pid", "host", "since", "heartbeat", "token"}`` that appears whole:
the record is written to a temporary file first and then hard-linked to the lock's name, which
fails if the lock exists (an exclusive create that never leaves an empty lock, even on a full
disk). A lock is taken over at once when its holder is gone:

- its process is dead (holder on this host);
- it is an earlier attempt of this Slurm job (a requeue keeps the job id, and Slurm starts the
  requeued job only after the old one has ended, possibly on another node);
- its heartbeat is older than ``stale_after`` seconds (holder on another host);
- it is empty or unreadable and older than ``_UNREADABLE_GRACE_S`` (left by a crash or a full disk).

On object stores, which have no exclusive create, the lock is advisory (check, write, read back).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlforge.errors import VlforgeError

_UNREADABLE_GRACE_S = 1.0  # an unreadable lock younger than this may be one being written (object stores)


class LockHeldError(VlforgeError):
    """The lock is held by a live holder (``holder``: its record, or None if unreadable)."""

    def __init__(self, message: str, holder: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.holder = holder


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown holder"
    beat = f", last heartbeat {holder['heartbeat']}" if holder.get("heartbeat") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}{beat}"


class FileLock:
    """One lock file; :meth:`acquire`, :meth:`beat` (refresh the heartbeat) and :meth:`release`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, stale_after: float | None = None) -> None:
        self.fs, self.path, self.stale_after = fs, path, stale_after
        now = _now()
        self.me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": now,
            "heartbeat": now,
            "token": secrets.token_hex(8),
            "slurm_job": _slurm_attempt(),
        }

    def acquire(self, timeout: float, poll: float = 0.2) -> None:
        """Take the lock, waiting up to ``timeout`` s for a live holder; else :class:`LockHeldError`."""
        deadline = time.monotonic() + timeout
        while not self._try_create():
            holder = self.read()
            if self._is_gone(holder):
                self._remove_if(holder)
                continue
            if time.monotonic() >= deadline:
                raise LockHeldError(f"{self.path} is held by {describe(holder)}", holder)
            time.sleep(poll)

    def beat(self) -> None:
        """Refresh the heartbeat (the record is replaced whole)."""
        self.me["heartbeat"] = _now()
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.fs.pipe_file(tmp, json.dumps(self.me).encode())
        except OSError:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
            raise
        if isinstance(self.fs, LocalFileSystem):
            os.replace(tmp, self.path)
        else:
            self.fs.mv(tmp, self.path)

    @contextlib.contextmanager
    def beating(self, every: float) -> Iterator[None]:
        """Beat every ``every`` seconds from a background thread while the block runs (for holders
        that do long work without a natural place to beat, such as the indexer)."""
        stop = threading.Event()

        def beat_until_stopped() -> None:
            while not stop.wait(every):
                with contextlib.suppress(OSError):  # a missed beat only delays a take-over
                    self.beat()

        thread = threading.Thread(target=beat_until_stopped, name="vlforge-lock-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def release(self) -> None:
        """Remove the lock if it is still ours (it may have been taken over after a long stall)."""
        held = self.read()
        if held is not None and held.get("token") == self.me["token"]:
            self.fs.rm_file(self.path)

    def read(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) else None

    # -- internals ----------------------------------------------------------------------------

    def _try_create(self) -> bool:
        data = json.dumps(self.me).encode()
        if not isinstance(self.fs, LocalFileSystem):
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, data)
            return self.read() == self.me
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:  # a full disk fails here, before the lock exists
                f.write(data)
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _is_gone(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            return self._age() >= _UNREADABLE_GRACE_S
        mine, earlier = self.me["slurm_job"], holder.get("slurm_job")
        if mine and earlier and earlier[0] == mine[0] and earlier[1] != mine[1]:
            return True  # an earlier attempt of this requeued job: Slurm ended it before restarting
        if holder.get("host") == socket.gethostname():
            return not _process_alive(holder.get("pid"))
        beat = holder.get("heartbeat") or holder.get("since")
        if self.stale_after is None or not beat:
            return False
        try:
            age = (datetime.now(UTC) - datetime.fromisoformat(beat)).total_seconds()
        except (TypeError, ValueError):
            return True
        return age > self.stale_after

    def _age(self) -> float:
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return 0.0
        mtime = info.get("mtime") or info.get("created")
        return time.time() - float(mtime) if isinstance(mtime, (int, float)) else _UNREADABLE_GRACE_S

    def _remove_if(self, holder: dict[str, Any] | None) -> None:
        """Remove the lock of a gone holder, unless someone else replaced it meanwhile."""
        if self.read() == holder:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)


def _process_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _slurm_attempt() -> list[str] | None:
    """``[job id, restart count]`` inside a Slurm job, else None."""
    job = os.environ.get("SLURM_JOB_ID")
    return [job, os.environ.get("SLURM_RESTART_COUNT", "0")] if job else None


def _now() -> str:
    return datetime.now(UTC).isoformat()
