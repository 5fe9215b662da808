"""Checkpoints in ``<run dir>/checkpoints/step_<8 digits>.pt``, written atomically.

A checkpoint is first written under a ``.tmp`` name and then renamed, so a
crash mid-write never leaves a file that looks complete: the latest
checkpoint is simply the highest-numbered ``step_*.pt`` present. Works on any
fsspec URL (on object stores the rename is a copy+delete of a finished file).
"""

from __future__ import annotations

import io
import re
from typing import Any

import fsspec
import torch

NAME = re.compile(r"step_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/checkpoints"


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, url) of every complete checkpoint, oldest first."""
    fs, path = fsspec.core.url_to_fs(checkpoint_dir(run_dir))
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        match = NAME.search(entry)
        if match:
            found.append((int(match.group(1)), fs.unstrip_protocol(entry)))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int) -> str:
    """Write ``state`` atomically as the checkpoint of ``step``; keep the newest ``keep``."""
    fs, directory = fsspec.core.url_to_fs(checkpoint_dir(run_dir))
    fs.makedirs(directory, exist_ok=True)
    final = f"{directory}/step_{step:08d}.pt"
    temporary = final + ".tmp"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with fs.open(temporary, "wb") as f:
        f.write(buffer.getbuffer())
    fs.mv(temporary, final)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        fs.rm(fsspec.core.url_to_fs(old)[1])
    return fs.unstrip_protocol(final)


def load_checkpoint(url: str) -> dict[str, Any]:
    with fsspec.open(url, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def read_model_state(source: str) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint file or a run directory's latest checkpoint (CPU)."""
    from vlforge.errors import UserError

    url = source if source.endswith(".pt") else latest_checkpoint(source)
    if url is None:
        raise UserError(f"no checkpoint in {source}")
    return load_checkpoint(url)["model"]


def load_model_weights(model: torch.nn.Module, source: str) -> None:
    """Load the model weights of a checkpoint file, or of a run directory's latest checkpoint.

    Every tensor must fit (strict): the source run must have the same architecture.
    """
    from vlforge.errors import UserError

    try:
        state = read_model_state(source)
    except UserError as exc:
        raise UserError(f"model.init_from: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or differently shaped tensors
        raise UserError(f"model.init_from: {source} does not fit this model: {exc}") from None
