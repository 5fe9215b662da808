"""Shard URL lists: brace expansion, and opening any fsspec URL for sequential reading.

``expand_urls("s3://b/{00000..00002}.tar")`` gives the three shard URLs;
``{a,b}`` alternatives and several groups (even nested) expand like bash's,
left to right. A numeric range keeps the zero padding of its bounds.

HTTP(S) requests that fail transiently (a 408/429/5xx answer, a reset or
refused connection, no byte for ``HTTP_TIMEOUT_S``) are retried up to
``HTTP_ATTEMPTS`` times in all, waiting ``HTTP_BACKOFF_S`` doubled per retry
(at most ``HTTP_BACKOFF_MAX_S``). Opening a stream and reading a whole file
(an image) are retried; a stream that breaks off after it started is not (the
shard is counted as broken). Each retry is counted (``take_http_retries``;
the train stream logs them as ``data/http_retries``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import IO, TypeVar

log = logging.getLogger("vlforge.data")

HTTP_ATTEMPTS = 4
HTTP_BACKOFF_S = 0.5
HTTP_BACKOFF_MAX_S = 8.0
HTTP_TIMEOUT_S = 60.0  # connecting, or waiting for the next bytes
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_http_retries = 0  # retries in this process since the last take_http_retries()
Result = TypeVar("Result")

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_urls(spec: str | Iterable[str]) -> list[str]:
    """Every URL named by ``spec`` (a pattern, or a list of patterns), in order."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return [url for pattern in patterns for url in _expand(pattern)]


def _expand(pattern: str) -> list[str]:
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = _matching_brace(pattern, start)
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    return [head + choice + rest for choice in _choices(body) for rest in _expand(tail)]


def _matching_brace(pattern: str, start: int) -> int:
    depth = 0
    for index in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced '{{' in URL pattern '{pattern}'")


def _choices(body: str) -> list[str]:
    """The alternatives of one ``{...}`` group: a numeric range, or comma-separated (nested) patterns."""
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.lstrip("-").startswith("0") else 0
        low, high = int(first), int(last)
        step = 1 if high >= low else -1
        return [str(i).zfill(width) for i in range(low, high + step, step)]
    parts, depth, current = [], 0, ""
    for char in body:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current += char
    parts.append(current)
    return [expanded for part in parts for expanded in _expand(part)]


def open_for_reading(url: str) -> IO[bytes]:
    """A binary file object reading ``url`` from its start (local path or any fsspec URL).

    HTTP is opened as a plain stream (``block_size=0``): it needs no range
    requests, which many servers (python's http.server among them) refuse.
    """
    import fsspec

    if not is_http(url):
        return fsspec.open(url, "rb").open()
    return with_http_retries(url, lambda: fsspec.open(url, "rb", **_http_options()).open())


def read_bytes(url: str) -> bytes:
    if not is_http(url):
        with open_for_reading(url) as stream:
            return stream.read()
    import fsspec

    def read_all() -> bytes:
        with fsspec.open(url, "rb", **_http_options()) as stream:
            return stream.read()

    return with_http_retries(url, read_all)


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _http_options() -> dict:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=HTTP_TIMEOUT_S, sock_read=HTTP_TIMEOUT_S)
    return {"block_size": 0, "client_kwargs": {"timeout": timeout}}


def with_http_retries(url: str, request: Callable[[], Result]) -> Result:
    """``request()``, retried with bounded exponential backoff while it fails transiently."""
    global _http_retries
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            return request()
        except Exception as exc:
            if attempt == HTTP_ATTEMPTS or not is_transient(exc):
                raise
            delay = min(HTTP_BACKOFF_MAX_S, HTTP_BACKOFF_S * 2 ** (attempt - 1))
            log.info("data: %s failed (%s), retry %d in %.1fs", url, _cause(exc), attempt, delay)
            _http_retries += 1
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def take_http_retries() -> int:
    """HTTP retries in this process since the last call (the reader adds them to its counts)."""
    global _http_retries
    taken, _http_retries = _http_retries, 0
    return taken


def is_transient(exc: BaseException) -> bool:
    """Whether a failure (or what caused it: fsspec wraps HTTP errors) may pass on a retry."""
    import asyncio

    import aiohttp

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, aiohttp.ClientResponseError):
            return seen.status in TRANSIENT_STATUS
        if isinstance(seen, aiohttp.ClientConnectionError | asyncio.TimeoutError | ConnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _cause(exc: BaseException) -> str:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return f"{type(root).__name__}: {root}"


def join_url(root: str, path: str) -> str:
    """``path`` relative to ``root`` (a folder path or URL); an absolute path or URL is kept."""
    if not root or "://" in path or path.startswith("/"):
        return path
    return f"{root.rstrip('/')}/{path}"


def parent_url(url: str) -> str:
    """The folder holding ``url`` ("" for a bare file name)."""
    return url.rsplit("/", 1)[0] if "/" in url else ""
