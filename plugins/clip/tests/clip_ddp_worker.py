"""Worker for the 2-process gloo test: imported by name in spawned children, so not a test module."""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from vlforge_plugins.clip.loss import InfoNCE

from vlforge.distributed import leave_group

BATCH = 8


class Towers(nn.Module):
    """Two linear 'encoders' and the objective, so DDP also averages the logit scale's gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(12, 6)
        self.text = nn.Linear(10, 6)
        self.objective = InfoNCE(math.log(1 / 0.07))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.image(images), dim=-1)  # (n, E)
        text = F.normalize(self.text(texts), dim=-1)
        return self.objective.loss(image, text)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 12, generator=generator), torch.randn(BATCH, 10, generator=generator)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def run(rank: int, world: int, out_dir: str) -> None:
    """Each rank: its half of the batch through DDP, backward, save the (averaged) gradients."""
    torch.set_num_threads(1)
    # A file rendezvous: no port to pick, so no race with other processes for a "free" one.
    init = f"file://{out_dir}/rendezvous"
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    model = DistributedDataParallel(Towers())
    images, texts = batch()
    n = BATCH // world
    rows = slice(rank * n, (rank + 1) * n)
    loss = model(images[rows], texts[rows])
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": gradients(model.module)}, f"{out_dir}/rank{rank}.pt")
    leave_group()
