"""Saving and loading a run's state with torch.distributed.checkpoint (DCP).

Model and optimizer state go through ``get_state_dict``/``set_state_dict``, which give the same
fully-qualified keys for a plain module, a DDP replica and a ``fully_shard``-ed (FSDP2) one: a
replicated tensor is written once (DCP spreads them over the ranks), a sharded one by each rank
for its shard, and on load each rank reads only the chunks that overlap what it holds, whatever
the world size was at save. The rest of the run's state (small, picklable) is rank 0's ``train_state.pt``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from vlforge import distributed as dist
from vlforge.checkpoint import layout
from vlforge.results.diskfull import is_disk_full
from vlforge.results.rundir import to_url


@contextmanager
def single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


@contextmanager
def discarded_on_failure(tmp_url: str) -> Iterator[None]:
    """Remove a save's ``step_X.tmp`` (on rank 0) when the save fails: on a full disk the space it
    holds is what the run's last metric rows and final status need. Never read, it would only be
    pruned later. A full disk is raised as an OSError naming the checkpoint (DCP's
    CheckpointException, a BaseException, names no file)."""
    try:
        yield
    except BaseException as e:
        if dist.rank() == 0:
            with contextlib.suppress(OSError):  # already committed (renamed), or not there
                layout.remove(tmp_url)
        if is_disk_full(e) and not getattr(e, "filename", None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp_url) from e
        raise


def storage_writer(url: str) -> dcp.StorageWriter:
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return dcp.FileSystemWriter(path, single_file_per_rank=True, thread_count=1)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, single_file_per_rank=True)


def storage_reader(url: str) -> dcp.StorageReader:
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return dcp.FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url)


def saved_keys(url: str) -> dict[str, torch.Size | None]:
    """Model keys a DCP checkpoint holds, with their (global) shapes; read from ``.metadata`` only."""
    metadata = storage_reader(url).read_metadata().state_dict_metadata
    return {
        key.removeprefix("model."): getattr(entry, "size", None)
        for key, entry in metadata.items()
        if key.startswith("model.")
    }


class Checkpointer:
    """Writes a run's checkpoints (every rank calls it together) and loads them back.

    At most one asynchronous save is in flight: the next save, a load, or :meth:`wait` first
    finishes it. Its commit (manifest, rename, retention) happens only once every rank's
    shards are written, so a crash during it leaves the previous checkpoint the latest.
    """

    def __init__(self, run_dir: str, keep: int) -> None:
        self.run_dir = run_dir
        self.keep = keep
        self._pending: Future[str | None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._group: Any = None  # a gloo group of its own: async collectives run beside training's

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_state: dict[str, Any] | None,
        *,
        exclude: Iterable[str] = (),
        blocking: bool = True,
    ) -> str | None:
        """Write the checkpoint of ``step``; ``train_state`` is rank 0's (None on the others).

        ``exclude``: model keys not to write (frozen weights the recipe reloads). Returns the
        committed URL on rank 0 when ``blocking``; None otherwise.
        """
        self.wait()
        excluded = sorted(exclude)
        url = self._prepare(step, train_state, excluded)
        model_state, optim_state = get_state_dict(model, optimizer)
        for key in excluded:
            model_state.pop(key, None)
        state = {"model": model_state, "optimizer": optim_state}
        manifest = {"step": step, "excluded": excluded}
        if blocking:
            with discarded_on_failure(url):
                with single_process_quiet():
                    dcp.save(state, storage_writer=storage_writer(url), no_dist=not dist.is_distributed())
                return self._finish(url, manifest)
        with discarded_on_failure(url), single_process_quiet():
            staged = dcp.async_save(
                state,
                storage_writer=storage_writer(url),
                process_group=self._async_group(),
                no_dist=not dist.is_distributed(),
            )
        self._executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix="vlforge-ckpt")
        self._pending = self._executor.submit(self._complete, staged, url, manifest)
        return None

    def _complete(self, staged: Future[Any], url: str, manifest: dict[str, Any]) -> str | None:
        """The background part of an asynchronous save: wait for its shards, then commit."""
        with discarded_on_failure(url):
            staged.result()
            return self._finish(url, manifest)

    def wait(self) -> str | None:
        """Finish the save in flight (if any); its URL on rank 0, else None. Raises what it raised."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def _prepare(self, step: int, train_state: dict[str, Any] | None, excluded: list[str]) -> str:
        """An empty ``step_X.tmp`` directory holding rank 0's train state; every rank agrees on it."""
        fs, directory = fsspec.core.url_to_fs(layout.checkpoint_dir(self.run_dir))
        tmp = f"{directory}/{layout.step_name(step)}{layout.TMP_SUFFIX}"
        if dist.rank() == 0:
            if fs.exists(tmp):  # a crashed attempt's leftovers
                fs.rm(tmp, recursive=True)
            with discarded_on_failure(to_url(fs, tmp)):
                fs.makedirs(tmp, exist_ok=True)
                buffer = io.BytesIO()
                torch.save(train_state, buffer)
                fs.pipe_file(f"{tmp}/{layout.TRAIN_STATE}", buffer.getvalue())
        dist.barrier()
        return to_url(fs, tmp)

    def _finish(self, url: str, manifest: dict[str, Any]) -> str | None:
        """Hash this rank's files; rank 0 commits once every rank has, then prunes."""
        layout.write_rank_parts(url, dist.rank())
        if dist.rank() != 0:
            return None
        fs, final = fsspec.core.url_to_fs(url.removesuffix(layout.TMP_SUFFIX))
        if fs.exists(final):  # this step, saved before a resume from an older (intact) checkpoint
            fs.rm(final, recursive=True)
        committed = layout.commit(url, manifest, dist.world_size())
        layout.prune(self.run_dir, self.keep)
        return committed

    def _async_group(self) -> Any:
        if dist.is_distributed() and self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")
        return self._group

    # ------------------------------------------------------------------ load

    def load(self, url: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load model and optimizer state in place (resharded to this world); returns the train state."""
        self.wait()
        if layout.is_legacy(url):
            return load_legacy(url, model, optimizer)
        excluded = layout.read_manifest(url).get("excluded", [])
        model_state, optim_state = get_state_dict(model, optimizer)
        for key in excluded:
            model_state.pop(key, None)
        state = {"model": model_state, "optimizer": optim_state}
        with single_process_quiet():
            dcp.load(state, storage_reader=storage_reader(url), no_dist=not dist.is_distributed())
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=not excluded),
        )
        return read_train_state(url)


def load_legacy(url: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Resume from a single-file checkpoint of the format before DCP (same world size, unsharded
    model: every rank reads the whole file)."""
    from vlforge.checkpoint.legacy import load_checkpoint

    checkpoint = load_checkpoint(url)
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except RuntimeError as exc:
        raise RuntimeError(
            f"{url} (the single-file format) cannot be loaded into this model ({exc}); resume it once "
            "with the world size and train.parallel it was saved with: the next checkpoint is a DCP one"
        ) from None
    return checkpoint


def read_train_state(url: str) -> dict[str, Any]:
    from vlforge.checkpoint.legacy import load_checkpoint  # a torch.save file, read the same way

    return load_checkpoint(f"{url.rstrip('/')}/{layout.TRAIN_STATE}")


def load_model(model: nn.Module, url: str) -> list[str]:
    """Load a DCP checkpoint's model weights into ``model`` (plain, DDP or FSDP2; every rank or one
    process). Returns mismatches (missing, unexpected, differently shaped keys); loads only if none."""
    saved = saved_keys(url)
    excluded = set(layout.read_manifest(url).get("excluded", []))
    template = get_model_state_dict(model)
    problems = [f"missing {k}" for k in template if k not in saved and k not in excluded]
    problems += [f"unexpected {k}" for k in saved if k not in template]
    problems += [
        f"{k}: saved {tuple(saved[k])}, model {tuple(v.shape)}"
        for k, v in template.items()
        if k in saved and saved[k] is not None and isinstance(v, torch.Tensor) and saved[k] != v.shape
    ]
    if problems:
        return problems
    state = {"model": {k: v for k, v in template.items() if k not in excluded}}
    with single_process_quiet():
        dcp.load(state, storage_reader=storage_reader(url), no_dist=not dist.is_distributed())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not excluded))
    return []


def read_unsharded(url: str, keys: set[str] | None = None) -> dict[str, Any]:
    """The DCP state (``model``, ``optimizer``; ``keys`` only, if given) assembled whole in this
    process, without collectives, on CPU (DCP's ``dcp_to_torch_save`` does the same, to a file)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state, storage_reader=storage_reader(url), planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True
    )
    return state


def read_model(url: str) -> dict[str, torch.Tensor]:
    """The full, unsharded model state of a DCP checkpoint, in this process (no collective), on CPU."""
    return read_unsharded(url, keys={"model"})["model"]


def consolidate(url: str, output: str) -> int:
    """Write the checkpoint as one ``torch.save`` file: its train state plus the whole ``model``
    and ``optimizer`` (keyed by parameter name). Serves ``model.init_from`` and export; returns bytes."""
    state = {**read_train_state(url), **read_unsharded(url), "format": "vlforge-consolidated"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with fsspec.open(output, "wb") as f:
        f.write(buffer.getbuffer())
    return buffer.getbuffer().nbytes
