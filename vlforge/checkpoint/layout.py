"""Where checkpoints live, how one is committed, and how it is verified.

Layout of ``<run dir>/checkpoints/``::

    step_00000100/            a committed checkpoint (the rename is the commit)
        .metadata             DCP's index of every tensor chunk (written by rank 0)
        __<rank>_<n>.distcp   each rank's shards (DCP)
        train_state.pt        progress, scheduler, per-rank RNG and data positions, plugin state
        manifest.json         step, world size, and every file's size and sha256 (written last)
    step_00000200.tmp/        being written: never read
    step_00000050.pt          the format before DCP (one torch.save of everything; still loads)

A save writes ``step_X.tmp/``; each rank hashes the files it wrote into ``parts_<rank>.json``;
rank 0 then merges them into ``manifest.json`` and renames the directory. A crash at any moment
thus leaves either no ``step_X`` or a complete one, and the previous checkpoints untouched.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zipfile
from typing import Any

import fsspec

from vlforge.results.rundir import to_url, write_atomic

STEP_DIR = re.compile(r"step_(\d{8})$")
LEGACY_FILE = re.compile(r"step_(\d{8})\.pt$")
TMP_SUFFIX = ".tmp"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
FORMAT = 2  # 1: the single-file .pt format


def checkpoint_dir(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def is_legacy(url: str) -> bool:
    return url.rstrip("/").endswith(".pt")


def step_of(url: str) -> int:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    match = STEP_DIR.search(name) or LEGACY_FILE.search(name)
    if match is None:
        raise ValueError(f"{url} is not a checkpoint (step_XXXXXXXX or step_XXXXXXXX.pt)")
    return int(match.group(1))


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, url) of every committed checkpoint (DCP directories and legacy files), oldest first.

    Committed means renamed into place; whether the files are intact is :func:`verify`'s question.
    """
    fs, path = fsspec.core.url_to_fs(checkpoint_dir(run_dir))
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        directory = entry["type"] == "directory"
        match = STEP_DIR.search(name) if directory else LEGACY_FILE.search(name)
        if match:
            found.append((int(match.group(1)), to_url(fs, entry["name"])))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest committed checkpoint whose files are all there with their recorded sizes.

    Cheap (only manifests are read; no shard); :func:`verify` with checksums is what a resume runs.
    """
    for _, url in reversed(list_checkpoints(run_dir)):
        if verify(url, checksums=False) is None:
            return url
    return None


# --------------------------------------------------------------------------- manifest


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe_parts(fs: fsspec.AbstractFileSystem, directory: str, names: list[str]) -> dict[str, Any]:
    """{name: {"size", "sha256"}} of files in ``directory``."""
    return {
        name: {"size": fs.size(f"{directory}/{name}"), "sha256": sha256_file(fs, f"{directory}/{name}")}
        for name in names
    }


def rank_files(fs: fsspec.AbstractFileSystem, directory: str, rank: int) -> list[str]:
    """The files DCP's writer of ``rank`` produced (``__<rank>_<n>.distcp``; rank 0 also ``.metadata``)."""
    names = [entry.rsplit("/", 1)[-1] for entry in fs.ls(directory, detail=False)]
    mine = [n for n in names if n.startswith(f"__{rank}_") and n.endswith(".distcp")]
    return sorted(mine + ([".metadata", TRAIN_STATE] if rank == 0 else []))


def write_rank_parts(url: str, rank: int) -> None:
    """Hash the files this rank wrote into ``parts_<rank>.json`` (rank 0 merges them at commit)."""
    fs, directory = fsspec.core.url_to_fs(url)
    parts = describe_parts(fs, directory, rank_files(fs, directory, rank))
    write_atomic(fs, f"{directory}/parts_{rank}.json", json.dumps(parts).encode())  # rank 0 polls it


def commit(url: str, manifest: dict[str, Any], world_size: int, timeout_s: float = 600.0) -> str:
    """Merge every rank's parts into the manifest and rename ``step_X.tmp`` to ``step_X``.

    Waits (up to ``timeout_s``) for ranks still hashing; returns the committed URL.
    """
    fs, directory = fsspec.core.url_to_fs(url)
    deadline = time.monotonic() + timeout_s
    parts: dict[str, Any] = {}
    for rank in range(world_size):
        name = f"{directory}/parts_{rank}.json"
        while not fs.exists(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"checkpoint {url}: rank {rank} did not finish writing its shards")
            time.sleep(0.05)
        parts.update(json.loads(fs.cat_file(name)))
    manifest = {**manifest, "format": FORMAT, "world_size": world_size, "parts": parts}
    manifest["bytes"] = sum(part["size"] for part in parts.values())
    fs.pipe_file(f"{directory}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    for rank in range(world_size):
        fs.rm(f"{directory}/parts_{rank}.json")
    final = directory.removesuffix(TMP_SUFFIX)
    fs.mv(directory, final, recursive=True)
    return to_url(fs, final)


def read_manifest(url: str) -> dict[str, Any]:
    fs, directory = fsspec.core.url_to_fs(url)
    return json.loads(fs.cat_file(f"{directory}/{MANIFEST}"))


# --------------------------------------------------------------------------- verification


def verify(url: str, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with the checkpoint at ``url`` (None: intact).

    ``share = (rank, world)`` checks only every ``world``-th file from ``rank`` on, so that ranks
    verify a checkpoint together, each reading a part of it.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if is_legacy(url):
        return _verify_legacy(fs, path, checksums)
    try:
        manifest = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
    except FileNotFoundError:
        return f"no {MANIFEST} (not committed)"
    except ValueError as exc:
        return f"{MANIFEST} is damaged ({exc})"
    rank, world = share
    for name, part in sorted(manifest["parts"].items())[rank::world]:
        file = f"{path}/{name}"
        try:
            size = fs.size(file)  # one stat per file (a request each on object stores)
        except FileNotFoundError:
            return f"{name} is missing"
        if size != part["size"]:
            return f"{name} has {size} bytes, the manifest says {part['size']} (truncated?)"
        if checksums and sha256_file(fs, file) != part["sha256"]:
            return f"{name} does not match its sha256 checksum (damaged)"
    return None


def _verify_legacy(fs: fsspec.AbstractFileSystem, path: str, checksums: bool) -> str | None:
    """A torch.save file is a zip archive: its central directory and every member's CRC-32."""
    if not checksums:
        return None
    try:
        with fs.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"not a readable torch.save file ({exc})"
    return f"member {broken} fails its CRC check (damaged)" if broken else None


def remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(path, recursive=fs.isdir(path))


def prune(run_dir: str, keep: int) -> None:
    """Keep the newest ``keep`` committed checkpoints, and drop leftover ``.tmp`` directories older
    than the newest committed one (a crashed save's)."""
    found = list_checkpoints(run_dir)
    for _, url in found[:-keep]:
        remove(url)
    if not found:
        return
    fs, path = fsspec.core.url_to_fs(checkpoint_dir(run_dir))
    for entry in fs.ls(path, detail=False):
        match = STEP_DIR.search(entry.rstrip("/").removesuffix(TMP_SUFFIX))
        if entry.rstrip("/").endswith(TMP_SUFFIX) and match and int(match.group(1)) < found[-1][0]:
            fs.rm(entry, recursive=True)
