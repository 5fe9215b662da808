"""WebDataset tar shards: read samples from a stream, write shards.

A sample is the run of consecutive members that share a key: the member
path up to the first dot of its file name (``00001/000010003.jpg`` and
``00001/000010003.txt`` are fields ``jpg`` and ``txt`` of sample
``00001/000010003``). This is img2dataset's layout (``key.jpg``, ``key.txt``,
``key.json``) and WebDataset's convention.

Reading is sequential (tar's streaming mode), so a shard can come from any
stream, HTTP included, without seeking. Damage raises ``BadShard``: the
samples before it have been yielded, the one being read is lost.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from vlforge.data.urls import open_for_reading

KEY_FIELD = "__key__"
URL_FIELD = "__url__"


class BadShard(Exception):
    """A shard (or any unit of samples) could not be read to its end; ``kind`` says how."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # "unreachable" | "truncated" | "unreadable"


def split_key(name: str) -> tuple[str, str]:
    """Member path -> (sample key, field): the field is the file name after its first dot, lowercased."""
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field.lower()


def read_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of the tar shard at ``url``, in file order: ``{field: bytes, "__key__", "__url__"}``."""
    sample: dict[str, Any] = {}
    started = False  # a member has been read: later failures are damage, not an unreachable shard
    # Anything raised while reading this shard's bytes (fsspec, aiohttp, tarfile) is the shard's failure.
    try:
        with (
            open_for_reading(url) as raw,
            tarfile.open(fileobj=(stream := _Tail(raw)), mode="r|*") as archive,
        ):
            for member in archive:
                if not member.isfile():
                    continue
                key, field = split_key(member.name)
                if not field or key.rpartition("/")[2].startswith("_"):
                    continue  # not a sample field (e.g. a stray index file)
                if sample and sample[KEY_FIELD] != key:
                    yield sample
                    sample = {}
                sample.setdefault(KEY_FIELD, key)
                sample[URL_FIELD] = url
                sample[field] = archive.extractfile(member).read()
                started = True
            if archive.fileobj.comptype == "tar" and not stream.ends_archive():
                raise EOFError("truncated: the shard ends without tar's end-of-archive block")
    except Exception as exc:
        raise BadShard(failure_kind(exc, started), f"{url}: {type(exc).__name__}: {exc}") from exc
    if sample:
        yield sample


class _Tail:
    """A read-only stream that remembers how many bytes it gave and the last block of them.

    tarfile's stream mode takes a shard cut at a member boundary, or inside a header,
    for the end of the archive; a whole tar ends with zero blocks, a cut one does not.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.size, self.tail = stream, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.size += len(data)
        self.tail = (self.tail + data)[-tarfile.BLOCKSIZE :]
        return data

    def ends_archive(self) -> bool:
        """Whether what was read, and what is left, ends like a whole tar (whole zero blocks)."""
        while self.read(tarfile.RECORDSIZE):  # the rest is padding after the end-of-archive block
            pass
        return self.size % tarfile.BLOCKSIZE == 0 and not self.tail.strip(b"\0")


def failure_kind(exc: Exception, started: bool) -> str:
    """How reading a shard failed, from the exception and whether any of it had been read."""
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "unexpected end" in text or "truncated" in text:
        return "truncated"
    if not started and not isinstance(exc, tarfile.TarError):
        return "unreachable"  # could not open or fetch it (missing file, refused connection, HTTP error)
    return "unreadable"  # not a tar, or a broken header


class TarWriter:
    """Writes samples (``{"__key__": key, field: bytes|str}``) into one tar stream, in order."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.archive = tarfile.open(fileobj=stream, mode="w|")  # noqa: SIM115 (closed by close())
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        key = sample[KEY_FIELD]
        for field, value in sample.items():
            if field.startswith("__"):
                continue
            data = value.encode() if isinstance(value, str) else value
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size, info.mode = len(data), 0o444  # mtime stays 0: same input, same bytes
            self.archive.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self.archive.close()
