"""``train.parallel = "ddp"``: DistributedDataParallel with the options of ``[train.ddp]``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from vlforge.recipe import DDPSection


def replicate(model: nn.Module, device: torch.device, options: DDPSection) -> nn.Module:
    """DDP around ``model``; bf16 gradient compression through torch's communication hook."""
    wrapped = nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=options.gradient_as_bucket_view,
        static_graph=options.static_graph,
        forward_sync_buffers=options.broadcast_buffers,
    )
    if options.grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        wrapped.register_comm_hook(None, bf16_compress_hook)
    return wrapped
