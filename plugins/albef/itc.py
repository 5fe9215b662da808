"""``albef.itc``: image-text contrastive loss against momentum queues, with momentum distillation.

For a micro-batch of B pairs (methods.md §2.3), with online embeddings v, t,
momentum embeddings v', t' (the teacher, unmasked) and queues of Q earlier
momentum embeddings:

    keys  K_t = [t'; text_queue] (B+Q, E),   K_v = [v'; image_queue]
    s_i2t = v·K_tᵀ/τ,  s_t2i = t·K_vᵀ/τ      online, (B, B+Q)
    s'_i2t = v'·K_tᵀ/τ, s'_t2i = t'·K_vᵀ/τ   momentum, no grad
    y     = one-hot on the first B columns (or, image-id aware, every key of the same image, normalised)
    q     = α·softmax(s') + (1−α)·y
    L     = ½ [CE(s_i2t, q_i2t) + CE(s_t2i, q_t2i)]

computed in fp32 even under autocast (1/τ reaches 1000). τ is learnable and
clamped to its range at the start of every forward, as in ALBEF.

After the loss, the momentum embeddings of every rank (``gather_no_grad``) are
written into the queues at the pointer, in the forward as in ALBEF, so under
gradient accumulation every micro-batch enqueues G = micro-batch × world size
rows and Q must be a multiple of G (checked when the run is built). The queues
and pointer are buffers: identical on all ranks, saved in checkpoints. Queues
are stored row-major (Q, E): one feature per row (ALBEF keeps (E, Q) columns).

The similarities to the batch's own momentum keys, with every positive set to
−inf, are left in ``step.cache`` for ``albef.itm`` to draw hard negatives from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from vlforge_plugins.albef.distill import alpha_at, soft_cross_entropy

from vlforge.distributed import gather_no_grad
from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge.engine import TrainState
    from vlforge.model import Progress

NEGATIVE_LOGITS = "albef.itc.negative_logits"  # step.cache key: (i2t, t2i) (B, B), positives at −inf
NO_IMAGE = -100  # image id of queue slots not written yet: matches no real id


def itc_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    temperature: torch.Tensor,
    alpha: float,
    positives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ITC loss and the online similarities (s_i2t, s_t2i), all in fp32.

    ``image``/``text`` (B,E) online embeddings; ``image_keys``/``text_keys``
    (B+Q, E) momentum keys, this batch first (row i is pair i's key);
    ``positives`` (B, B+Q) bool, True where key j shows sample i's image.
    """
    batch = image.shape[0]
    with torch.autocast(device_type=image.device.type, enabled=False):
        image_keys, text_keys, tau = image_keys.float(), text_keys.float(), temperature.float()
        sim_i2t = image.float() @ text_keys.T / tau  # (B, B+Q)
        sim_t2i = text.float() @ image_keys.T / tau
        hard = positives.float() / positives.sum(dim=1, keepdim=True)  # rows sum to 1
        targets_i2t = targets_t2i = hard
        if alpha > 0:
            with torch.no_grad():
                sim_i2t_m = image_keys[:batch] @ text_keys.T / tau  # v'·K_tᵀ/τ
                sim_t2i_m = text_keys[:batch] @ image_keys.T / tau
                targets_i2t = distillation_targets(hard, sim_i2t_m, alpha)
                targets_t2i = distillation_targets(hard, sim_t2i_m, alpha)
        loss = (
            soft_cross_entropy(sim_i2t, targets_i2t).mean() + soft_cross_entropy(sim_t2i, targets_t2i).mean()
        ) / 2
    return loss, sim_i2t, sim_t2i


def distillation_targets(hard: torch.Tensor, momentum_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, K) hard targets and momentum logits -> α·softmax(momentum) + (1−α)·hard; rows sum to 1."""
    return alpha * momentum_logits.softmax(dim=1) + (1 - alpha) * hard


class ImageTextContrastive(nn.Module):
    """``albef.itc``: ``objective(step)`` -> ``{"itc": loss}``; needs a vision + text momentum teacher."""

    def __init__(
        self,
        embed_dim: int,
        queue_size: int,
        init_temperature: float,
        temperature_range: tuple[float, float],
        alpha: float,
        alpha_warmup_epochs: float,
        image_ids: str | None = None,
    ) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(init_temperature))
        self.temperature_range = temperature_range
        self.alpha = alpha
        self.alpha_warmup_epochs = alpha_warmup_epochs
        self.image_ids = image_ids  # batch key of (B,) int image ids, or None
        self.register_buffer("image_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_buffer("id_queue", torch.full((queue_size,), NO_IMAGE, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, step: Any) -> dict[str, torch.Tensor]:
        self.clamp_temperature_()
        teacher = step.model.teacher
        image_m, text_m = teacher.image(step).embedding, teacher.text(step).embedding  # (B,E) no grad
        ids = step.batch[self.image_ids] if self.image_ids else None
        positives = self.positives(image_m.shape[0], ids, image_m.device)  # (B, B+Q)
        loss, sim_i2t, sim_t2i = itc_loss(
            step.image.embedding,
            step.text.embedding,
            torch.cat([image_m, self.image_queue]),  # a copy: the enqueue below writes the queue in place
            torch.cat([text_m, self.text_queue]),
            self.temperature,
            self.current_alpha(step.progress),
            positives,
        )
        batch = image_m.shape[0]
        in_batch_positives = positives[:, :batch]
        step.cache[NEGATIVE_LOGITS] = (
            sim_i2t[:, :batch].detach().masked_fill(in_batch_positives, float("-inf")),
            sim_t2i[:, :batch].detach().masked_fill(in_batch_positives, float("-inf")),
        )
        if self.training:
            self.enqueue(image_m, text_m, ids)
        return {"itc": loss}

    def positives(self, batch: int, ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """(B, B+Q) bool: the pair itself, or (image-id aware) every batch or queue key of the same image."""
        if ids is None:
            eye = torch.eye(batch, dtype=torch.bool, device=device)
            return F.pad(eye, (0, self.queue_size))
        ids = ids.to(device=device, dtype=torch.long)
        return ids[:, None] == torch.cat([ids, self.id_queue])[None, :]

    @torch.no_grad()
    def enqueue(self, image_m: torch.Tensor, text_m: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write every rank's (B,E) momentum embeddings at the pointer; advance it modulo Q (no host sync)."""
        images, texts = gather_no_grad(image_m.float()), gather_no_grad(text_m.float())  # (G, E)
        rows = images.shape[0]
        if self.queue_size % rows:
            raise ValueError(
                f"albef.itc: queue_size {self.queue_size} is not a multiple of the {rows} features "
                "enqueued per micro-batch (micro-batch × world size); a smaller last batch? use drop_last"
            )
        slots = (self.queue_ptr + torch.arange(rows, device=images.device)) % self.queue_size  # (G,)
        self.image_queue.index_copy_(0, slots, images)
        self.text_queue.index_copy_(0, slots, texts)
        if ids is not None:
            self.id_queue.index_copy_(0, slots, gather_no_grad(ids.to(images.device, torch.long)))
        self.queue_ptr.add_(rows).remainder_(self.queue_size)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        self.temperature.clamp_(*self.temperature_range)

    @property
    def queue_size(self) -> int:
        return self.image_queue.shape[0]

    def current_alpha(self, progress: Progress) -> float:
        return alpha_at(progress, self.alpha, self.alpha_warmup_epochs)

    @hookimpl
    def vlforge_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        metrics["albef/temperature"] = float(self.temperature.detach())
        metrics["albef/alpha"] = self.current_alpha(state.progress)
