"""FLIP (Li et al., CVPR 2023): CLIP training where the image tower sees a random subset of patches.

Components:

* masking ``flip.random``: per image, keep the prefix (CLS) tokens and a
  uniform random subset of K = ⌊N·(1 − ratio)⌋ patch tokens, in training only;
  ``unmasked_from_step``/``unmasked_from_samples`` switch the ratio to 0 for
  the last part of a run (unmasked tuning).
* text encoder ``flip.masked_text``: ``hf.text`` plus optional text masking
  that drops padding first (a paper ablation; off by default).

The loss is CLIP's (``clip.infonce``); the faithful-FLIP options (average
pooling, sin-cos position embeddings, AdamW β2 0.95, per-256 lr) are core
recipe keys, set in ``recipes/flip_*.toml``. This module stays light (no torch
import); the modules live in ``masking.py`` and ``text.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from vlforge.encoders import HFTextConfig
from vlforge.hookspecs import hookimpl
from vlforge.registry import ComponentConfig, Registry

if TYPE_CHECKING:
    from vlforge.components import BuildContext


class RandomMaskingConfig(ComponentConfig):
    """``[masking] type = "flip.random"``: FLIP's random patch masking."""

    ratio: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="fraction of patch tokens dropped per image in training; "
        "K = max(1, floor(N*(1-ratio))) computed exactly from the decimal written",
    )
    unmasked_from_step: int | None = Field(
        None, ge=0, description="from this optimizer step (0-based) on, ratio 0: unmasked tuning"
    )
    unmasked_from_samples: int | None = Field(
        None, ge=0, description="from the step that starts with this many global samples seen on, ratio 0"
    )

    @model_validator(mode="after")
    def _one_switch(self) -> RandomMaskingConfig:
        if self.unmasked_from_step is not None and self.unmasked_from_samples is not None:
            raise ValueError("give at most one of unmasked_from_step and unmasked_from_samples")
        return self


class MaskedTextConfig(HFTextConfig):
    """``[model.text] type = "flip.masked_text"``: ``hf.text`` with FLIP's text masking (training only)."""

    mask_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="fraction of the padded text positions dropped; 0: off"
    )
    padding_first: bool = Field(
        True, description="drop padding positions before real tokens (else uniformly at random)"
    )


def build_random_masking(config: RandomMaskingConfig, ctx: BuildContext) -> Any:
    """FLIP: keep a uniform random subset of patch tokens per image (training only)."""
    from vlforge_plugins.flip.masking import RandomMasking, StepGenerator

    vision = ctx.parts.get("vision")
    if vision is None or not hasattr(vision, "num_prefix_tokens"):
        raise ValueError("flip.random needs a [model.vision] encoder with a token stage (e.g. timm.vit)")
    return RandomMasking(
        config.ratio,
        StepGenerator(ctx.recipe.seed, "flip.random", ctx.rank),
        config.unmasked_from_step,
        config.unmasked_from_samples,
    )


def build_masked_text(config: MaskedTextConfig, ctx: BuildContext) -> Any:
    """hf.text plus FLIP's optional text masking (padding dropped first)."""
    from vlforge_plugins.flip.masking import StepGenerator
    from vlforge_plugins.flip.text import MaskedText

    from vlforge.encoders.text import build_hf_text

    encoder = build_hf_text(config, meta=ctx.meta)
    generator = StepGenerator(ctx.recipe.seed, "flip.masked_text", ctx.rank)
    return MaskedText(encoder, config.mask_ratio, config.padding_first, generator)


@hookimpl
def vlforge_register_components(registry: Registry) -> None:
    registry.add("masking", "flip.random", config=RandomMaskingConfig, factory=build_random_masking)
    registry.add("text_encoder", "flip.masked_text", config=MaskedTextConfig, factory=build_masked_text)
