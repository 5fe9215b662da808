"""A full disk as one clear error: which disk, which path, how much is free."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from vlforge.errors import VlforgeError

_NO_SPACE = "No space left on device"  # how DuckDB and others word ENOSPC when they wrap it


class DiskFullError(VlforgeError):
    """A write failed because the disk (or a quota) is full."""

    exit_code = 1


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _NO_SPACE in str(error)


def disk_full_message(error: BaseException, fallback_path: str) -> str:
    """``no space left on the disk at /mnt (0 B free of 20.0 MB) writing /mnt/run/x.jsonl``."""
    path = getattr(error, "filename", None) or fallback_path
    mount = mount_point(str(path))
    try:
        usage = shutil.disk_usage(mount)
        space = f" ({_size(usage.free)} free of {_size(usage.total)})"
    except OSError:
        space = ""
    return f"no space left on the disk at {mount}{space} writing {path}"


def mount_point(path: str) -> str:
    """The mount point that holds ``path`` (its nearest existing ancestor's)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


@contextmanager
def disk_full_is_an_error(path: str) -> Iterator[None]:
    """Turn a full disk met inside the block into :class:`DiskFullError` (``path``: what was written)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(f"{disk_full_message(e, path)}; free space there and try again") from e
        raise


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
