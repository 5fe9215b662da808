"""Shard URL lists: brace expansion, and opening any fsspec URL for sequential reading.

``expand_urls("s3://b/{00000..00002}.tar")`` gives the three shard URLs;
``{a,b}`` alternatives and several groups (even nested) expand like bash's,
left to right. A numeric range keeps the zero padding of its bounds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import IO

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

    options = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fsspec.open(url, "rb", **options).open()


def read_bytes(url: str) -> bytes:
    with open_for_reading(url) as stream:
        return stream.read()


def join_url(root: str, path: str) -> str:
    """``path`` relative to ``root`` (a folder path or URL); an absolute path or URL is kept."""
    if not root or "://" in path or path.startswith("/"):
        return path
    return f"{root.rstrip('/')}/{path}"


def parent_url(url: str) -> str:
    """The folder holding ``url`` ("" for a bare file name)."""
    return url.rsplit("/", 1)[0] if "/" in url else ""
