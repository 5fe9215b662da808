"""The format before DCP: one ``torch.save`` of the whole state in ``step_XXXXXXXX.pt``.

Such checkpoints still resume (at their world size; every rank reads the whole file) and serve
as ``model.init_from``. ``vlforge checkpoint inspect`` describes them; they need no conversion.
"""

from __future__ import annotations

import io
from typing import Any

import fsspec
import torch


def load_checkpoint(url: str) -> dict[str, Any]:
    """The whole state dict of a legacy file: model, optimizer, scheduler, progress, rng, data."""
    with fsspec.open(url, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
