"""Symmetric InfoNCE with a learnable logit scale, as a local loss across ranks.

Each rank scores its own n images against all N = world·n texts and its own
texts against all images (``gather_with_grad``), so memory is O(n·N) instead
of O(N²) and, because the gather's backward sums every rank's gradient into
each slice, DDP's gradient average equals the gradient of the global loss
(methods.md §1.2, §3.3).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.distributed import gather_with_grad, rank
from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge.engine import TrainState


def local_infonce(
    image: torch.Tensor,
    text: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int,
) -> torch.Tensor:
    """This rank's share of the symmetric InfoNCE over a global batch.

    ``image``/``text``: (n, E) this rank's normalised embeddings;
    ``all_image``/``all_text``: (N, E) every rank's, in rank order; ``offset``:
    the global index of this rank's first pair. The mean over ranks equals the
    global loss ½[CE(s·I·Tᵀ) + CE(s·T·Iᵀ)]. Computed in fp32 even under autocast.
    """
    with torch.autocast(device_type=image.device.type, enabled=False):
        scale = logit_scale.float().exp()
        logits_image = scale * image.float() @ all_text.float().T  # (n, N)
        logits_text = scale * text.float() @ all_image.float().T  # (n, N)
        labels = torch.arange(image.shape[0], device=image.device) + offset  # (n,) positives
        return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


class InfoNCE(nn.Module):
    """``clip.infonce``: ``objective(step)`` -> ``{"contrastive": loss}``.

    ``logit_scale`` s is a 0-d parameter (τ = exp(-s)); it is clamped in place
    to [0, max_log_scale] after every optimizer step (open_clip/CLIP), not
    inside the forward, so its gradient is never cut.
    """

    def __init__(
        self, init_logit_scale: float, learnable: bool = True, max_log_scale: float = math.log(100.0)
    ):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale), requires_grad=learnable)
        self.max_log_scale = max_log_scale

    def forward(self, step: Any) -> dict[str, torch.Tensor]:
        return {"contrastive": self.loss(step.image.embedding, step.text.embedding)}

    def loss(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(n, E), (n, E) normalised embeddings of this rank -> this rank's loss."""
        offset = rank() * image.shape[0]  # equal per-rank batches (drop_last), as DDP needs anyway
        return local_infonce(
            image, text, gather_with_grad(image), gather_with_grad(text), self.logit_scale, offset
        )

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.logit_scale.detach()))

    @hookimpl
    def vlforge_after_optimizer_step(self, state: TrainState) -> None:
        self.clamp_()

    @hookimpl
    def vlforge_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        metrics["clip/logit_scale"] = float(self.logit_scale.detach().exp())
