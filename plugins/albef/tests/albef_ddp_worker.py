"""Worker for the 2-process gloo queue test: imported by name in spawned children, so not a test module."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from vlforge_plugins.albef.itc import ImageTextContrastive

from vlforge.distributed import leave_group

EMBED, QUEUE, BATCH, ENQUEUES = 4, 8, 2, 3  # 2 ranks × 2 rows = 4 per enqueue: the third one wraps


def objective() -> ImageTextContrastive:
    torch.manual_seed(0)  # the engine seeds every rank alike before building, so queues start equal
    return ImageTextContrastive(EMBED, QUEUE, 0.07, (0.001, 0.5), 0.4, 1.0, image_ids="image_ids")


def features(rank: int, call: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (B,E) image and text features and (B,) ids for enqueue number ``call``."""
    generator = torch.Generator().manual_seed(100 * call + rank)
    image = F.normalize(torch.randn(BATCH, EMBED, generator=generator), dim=1)
    text = F.normalize(torch.randn(BATCH, EMBED, generator=generator), dim=1)
    ids = torch.arange(BATCH) + 10 * (2 * call + rank)
    return image, text, ids


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    """Each rank enqueues its own features ENQUEUES times, then saves its queue buffers."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    itc = objective()
    for call in range(ENQUEUES):
        itc.enqueue(*features(rank, call))
    torch.save({name: buffer.clone() for name, buffer in itc.named_buffers()}, f"{out_dir}/rank{rank}.pt")
    leave_group()
