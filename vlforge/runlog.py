"""``<run dir>/log.txt``: what rank 0 printed, its warnings, progress lines and the final status.

:class:`RunLog` copies ``sys.stdout`` and ``sys.stderr`` into the file while a run trains
(output of C extensions that write to the file descriptors directly is not seen). Progress-bar
redraws (writes with a carriage return) stay on the terminal; the log gets plain progress lines
instead (:func:`progress_line`), which are also printed when the bar is off or the output is not
a terminal. A local run directory's log is appended to line by line; on an object store, which
cannot append, the whole file is rewritten at most every ``upload_every`` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlforge.results.rundir import url_join, utc_now, write_atomic

LOG_NAME = "log.txt"
_active: RunLog | None = None  # the run log of this process, if one is open


class RunLog:
    """Tee this process's stdout and stderr into the run's ``log.txt`` (a context manager)."""

    upload_every = 10.0

    def __init__(self, run_dir: str) -> None:
        self.fs, self.path = fsspec.core.url_to_fs(url_join(run_dir, LOG_NAME))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.file: IO[str] | None = open(self.path, "a") if self.local else None  # noqa: SIM115
        self.text: list[str] = []
        if not self.local and self.fs.exists(self.path):  # an earlier attempt's lines
            self.text.append(self.fs.cat_file(self.path).decode(errors="replace"))
        self.last_upload = time.monotonic()
        self.saved: tuple[Any, Any] | None = None

    def write(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
            return
        self.text.append(text)
        if time.monotonic() - self.last_upload >= self.upload_every:
            self._upload()

    def _upload(self) -> None:
        write_atomic(self.fs, self.path, "".join(self.text).encode())
        self.last_upload = time.monotonic()

    def __enter__(self) -> RunLog:
        global _active
        self.saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        _active = self
        self.write(f"=== {utc_now()} attempt started: {' '.join(sys.argv)}\n")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _active
        if exc is not None:
            import traceback

            self.write("".join(traceback.format_exception(exc_type, exc, tb)))
        _active = None
        if self.saved:
            sys.stdout, sys.stderr = self.saved
        if self.file is not None:
            self.file.close()
        else:
            self._upload()


class _Tee:
    """A text stream that writes to ``stream`` and, minus progress-bar redraws, to the run log."""

    def __init__(self, stream: Any, log: RunLog) -> None:
        self.stream = stream
        self.log = log

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, ... of the real stream
        return getattr(self.stream, name)


def progress_line(text: str, to_terminal: bool) -> None:
    """A plain, greppable progress line: always into the run log, to stdout if ``to_terminal``."""
    line = f"{utc_now()} {text}\n"
    if to_terminal:
        out = sys.stdout.stream if isinstance(sys.stdout, _Tee) else sys.stdout
        out.write(line)
        out.flush()
    if _active is not None:
        _active.write(line)
