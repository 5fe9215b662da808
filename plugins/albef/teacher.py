"""``momentum`` teacher: an exponential moving average of named model parts (methods.md §1.3).

θ_m ← m·θ_m + (1−m)·θ for every parameter pair, in one fused
``torch._foreach_lerp_`` (θ_m + (1−m)(θ − θ_m)), applied in the
``vlforge_after_optimizer_step`` event: once per optimizer step, so once per
accumulation window. The original ALBEF updates at the start of every forward,
i.e. once per micro-batch under accumulation; without accumulation the two are
the same (its update in step k uses the weights the optimizer produced in step
k−1, which is what this hook sees at the end of step k−1). Buffers are copied
once and never averaged, as in ALBEF.

The copy is a child of the model (``VLModel.teacher``), so it is saved and
restored with every checkpoint and moved with ``.to()``; its parameters do not
require gradients, so the optimizer never sees them. It follows the model's
train/eval mode: in training its dropout is active, as in the original.
It never masks: with a masking component the student sees a subset of the
patches and the teacher all of them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge.components import TextOutput, VisionOutput
    from vlforge.engine import TrainState
    from vlforge.model import Step


def memoised(step: Step, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per micro-batch: later calls with the same key reuse ``step.cache``."""
    if key not in step.cache:
        step.cache[key] = compute()
    return step.cache[key]


class MomentumTeacher(nn.Module):
    """EMA copies of the online parts, in ``parts`` under the same names (vision, text, fusion, ...)."""

    def __init__(self, online: dict[str, nn.Module], momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        # One deepcopy of all parts, so weights shared between them stay shared in the copy.
        self.parts = nn.ModuleDict(copy.deepcopy(online))
        self.parts.requires_grad_(False)
        # A plain dict, not submodules: the online parts belong to the model, not to the teacher.
        self.online = dict(online)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step of every momentum parameter towards its online twin."""
        # Both sides list their parameters in the same order, each shared tensor once.
        online = nn.ModuleDict(self.online).parameters()
        torch._foreach_lerp_(list(self.parts.parameters()), list(online), 1.0 - self.momentum)

    @hookimpl
    def vlforge_after_optimizer_step(self, state: TrainState) -> None:
        self.update()

    # ------------------------------------------------------------------ momentum features

    def image(self, step: Step) -> VisionOutput:
        """The momentum vision part on the step's images (unmasked, no grad), once per micro-batch."""

        @torch.no_grad()
        def compute() -> VisionOutput:
            return self.parts["vision"](step.batch["images"])

        return memoised(step, "teacher.image", compute)

    def text(self, step: Step) -> TextOutput:
        """The momentum text part on the step's captions (no grad), once per micro-batch."""

        @torch.no_grad()
        def compute() -> TextOutput:
            return self.parts["text"](step.batch["input_ids"], step.batch["attention_mask"])

        return memoised(step, "teacher.text", compute)
