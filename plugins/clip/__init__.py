"""CLIP baseline: symmetric InfoNCE with a learnable temperature (objective ``clip.infonce``).

A dual-encoder recipe needs nothing else from this plugin: the encoders are the
core ``timm.vit`` and ``hf.text`` components with ``embed_dim`` set. The module
stays light (no torch import); the loss lives in ``loss.py``.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from vlforge.hookspecs import hookimpl
from vlforge.registry import ComponentConfig, Registry

if TYPE_CHECKING:
    from vlforge.components import BuildContext


class InfoNCEConfig(ComponentConfig):
    """``[objectives.<name>] type = "clip.infonce"``: symmetric InfoNCE over the global batch."""

    init_temperature: float = Field(0.07, gt=0, description="initial τ; the logit scale starts at ln(1/τ)")
    learnable: bool = Field(True, description="train the logit scale (else τ stays fixed)")
    max_logit_scale: float = Field(
        100.0, ge=1.0, description="exp(s) is clamped to [1, this] after every optimizer step"
    )

    @model_validator(mode="after")
    def _start_inside_clamp(self) -> InfoNCEConfig:
        if not 1.0 <= 1.0 / self.init_temperature <= self.max_logit_scale:
            raise ValueError(
                f"1/init_temperature = {1 / self.init_temperature:.4g} lies outside the clamp range "
                f"[1, max_logit_scale = {self.max_logit_scale:g}]"
            )
        return self

    @property
    def init_logit_scale(self) -> float:
        return math.log(1.0 / self.init_temperature)


def build_infonce(config: InfoNCEConfig, ctx: BuildContext) -> Any:
    """Symmetric InfoNCE (CLIP) with a learnable, clamped logit scale; local loss across ranks."""
    import torch
    from vlforge_plugins.clip.loss import InfoNCE

    _check_embeddings(ctx)
    with torch.device("meta") if ctx.meta else contextlib.nullcontext():
        return InfoNCE(config.init_logit_scale, config.learnable, math.log(config.max_logit_scale))


def _check_embeddings(ctx: BuildContext) -> None:
    """Both towers must project to the same joint width E > 0."""
    widths = {part: getattr(ctx.parts.get(part), "embed_dim", None) for part in ("vision", "text")}
    if any(not width for width in widths.values()):
        raise ValueError(f"clip.infonce needs model.vision and model.text with embed_dim > 0, got {widths}")
    if widths["vision"] != widths["text"]:
        raise ValueError(f"clip.infonce needs equal embed_dim in model.vision and model.text, got {widths}")


@hookimpl
def vlforge_register_components(registry: Registry) -> None:
    registry.add("objective", "clip.infonce", config=InfoNCEConfig, factory=build_infonce)
