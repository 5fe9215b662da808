"""encoders components (registered by vlforge.builtin): any timm ViT, any transformers text model.

This module stays light (no torch, timm or transformers import): it holds the
config models and registers factories that import the heavy code when called.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from vlforge.paths import RecipePath
from vlforge.registry import ComponentConfig, ConfigIssue, Registry, did_you_mean

if TYPE_CHECKING:
    from vlforge.components import BuildContext

# timm constructor arguments vlforge sets itself, and the config field that says it instead.
_TIMM_ARGS_OWNED = {
    "num_classes": "embed_dim (the projection; the classifier head is always removed)",
    "global_pool": "pool",
    "pretrained": "pretrained",
    "img_size": "img_size",
    "patch_size": "patch_size",
    "embed_dim": "width",
    "depth": "depth",
    "num_heads": "heads",
    "mlp_ratio": "mlp_ratio",
    "pos_embed": "pos_embed",
    "patch_drop_rate": "a [masking] component (e.g. type = 'flip.random')",
}


class TimmViTConfig(ComponentConfig):
    """``[model.vision] type = "timm.vit"``: any timm VisionTransformer (vit_*, deit_*, *_clip_*).

    Architecture fields left unset keep the timm model's own values. With
    ``pool = "avg"`` the final LayerNorm stays on the tokens (before pooling,
    as in FLIP); pass ``timm_kwargs = {fc_norm = true}`` for timm's
    norm-after-pool layout, ``{pool_include_prefix = true}`` to average the CLS
    token too (FLIP's JAX model does).
    """

    model: str = Field(..., description="timm model name, e.g. 'vit_base_patch16_224'")
    pretrained: RecipePath | None = Field(
        None,
        description="local weights file (.safetensors/.pth/.bin) for the timm model; "
        "position embeddings are resampled when the grid differs",
    )
    img_size: int | None = Field(None, gt=0, description="input side in pixels (default: the model's)")
    patch_size: int | None = Field(None, gt=0, description="patch side in pixels (default: the model's)")
    width: int | None = Field(None, gt=0, description="token width D (default: the model's)")
    depth: int | None = Field(None, gt=0, description="number of blocks (default: the model's)")
    heads: int | None = Field(None, gt=0, description="attention heads (default: the model's)")
    mlp_ratio: float | None = Field(None, gt=0, description="MLP hidden width / D (default: the model's)")
    pool: Literal["token", "avg"] = Field(
        "token", description="'token': CLS token; 'avg': mean of patch tokens"
    )
    embed_dim: int = Field(0, ge=0, description="joint embedding width E (bias-free projection); 0: none")
    pos_embed: Literal["learned", "sincos"] = Field(
        "learned", description="'sincos': fixed 2-D sin-cos table, not trained (FLIP); prefix tokens get none"
    )
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="other timm constructor arguments, e.g. {drop_path_rate = 0.1}"
    )
    gradient_checkpointing: bool = Field(
        False, description="activation checkpointing of every block (recomputed in backward, training only)"
    )

    @field_validator("timm_kwargs")
    @classmethod
    def _not_owned(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        owned = [f"'{key}' (use {_TIMM_ARGS_OWNED[key]})" for key in kwargs if key in _TIMM_ARGS_OWNED]
        if owned:
            raise ValueError(f"set by vlforge, not through timm_kwargs: {', '.join(owned)}")
        return kwargs

    def check_resources(self) -> Iterator[ConfigIssue]:
        """The timm model name exists; the pretrained file exists and its shapes fit (imports timm)."""
        import timm

        if not timm.is_model(self.model):
            hint = did_you_mean(self.model, timm.list_models())
            yield ConfigIssue(
                "model", f"unknown timm model '{self.model}'{hint} (`timm.list_models()` lists them)"
            )
            return
        if self.pretrained is None:
            return
        if not Path(self.pretrained).is_file():
            yield ConfigIssue("pretrained", f"weights file '{self.pretrained}' not found")
            return
        from vlforge.encoders.vision import pretrained_problem

        problem = pretrained_problem(self)
        if problem:
            yield ConfigIssue("pretrained", problem)


class HFTextConfig(ComponentConfig):
    """``[model.text] type = "hf.text"``: a transformers model (AutoModel) and its tokenizer.

    Exactly one of ``pretrained`` (a local folder) or ``config`` (a
    transformers config as a table, built with random weights).
    """

    pretrained: RecipePath | None = Field(None, description="local folder with config, weights and tokenizer")
    config: dict[str, Any] | None = Field(
        None,
        description="transformers config, e.g. {model_type = 'bert', hidden_size = 64, ...}; "
        "vocab_size, pad/bos/eos_token_id default to the tokenizer's",
    )
    tokenizer: RecipePath | None = Field(
        None,
        description="tokenizer: a shipped one ('vlforge:shapes', 'vlforge:bert-base-uncased') or a local "
        "folder (default: pretrained)",
    )
    max_length: int = Field(32, gt=0, description="texts are truncated to this many tokens")
    pool: Literal["first", "mean", "last"] = Field(
        "first",
        description="'first': first token (CLS); 'mean': mean of real tokens; 'last': last real token",
    )
    embed_dim: int = Field(0, ge=0, description="joint embedding width E (bias-free projection); 0: none")
    num_layers: int | None = Field(
        None,
        gt=0,
        description="run only the first N transformer layers (default: all); the removed layers are "
        "offered to a fusion module that continues from them (ALBEF's text/fusion split of one BERT)",
    )
    gradient_checkpointing: bool = Field(
        False, description="activation checkpointing of every layer (transformers' own, training only)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> HFTextConfig:
        if (self.pretrained is None) == (self.config is None):
            raise ValueError("give exactly one of 'pretrained' (a local folder) or 'config' (a table)")
        if self.config is not None:
            if "model_type" not in self.config:
                raise ValueError("'config' needs a 'model_type' (e.g. 'bert')")
            if self.tokenizer is None:
                raise ValueError("'config' needs a 'tokenizer' (e.g. 'vlforge:shapes' or a local folder)")
        return self

    def check_resources(self) -> Iterator[ConfigIssue]:
        """The pretrained folder and the tokenizer exist (nothing is loaded)."""
        from vlforge.data.tokenizers import tokenizer_spec_problem

        if self.pretrained is not None and not Path(self.pretrained).is_dir():
            yield ConfigIssue("pretrained", f"model folder '{self.pretrained}' not found")
            if self.tokenizer is None:
                return  # the tokenizer would come from that same folder
        problem = tokenizer_spec_problem(self.tokenizer or self.pretrained or "")
        if problem:
            yield ConfigIssue("tokenizer" if self.tokenizer else "pretrained", problem)


def build_timm_vit(config: TimmViTConfig, ctx: BuildContext) -> Any:
    """Any timm VisionTransformer, its token stage exposed for masking."""
    from vlforge.encoders.vision import build_timm_vit

    return build_timm_vit(config, meta=ctx.meta)


def build_hf_text(config: HFTextConfig, ctx: BuildContext) -> Any:
    """A transformers text model (pretrained folder or config) with its tokenizer."""
    from vlforge.encoders.text import build_hf_text

    return build_hf_text(config, meta=ctx.meta)


def register(registry: Registry) -> None:
    """Add this package's components to the registry."""
    registry.add("vision_encoder", "timm.vit", config=TimmViTConfig, factory=build_timm_vit)
    registry.add("text_encoder", "hf.text", config=HFTextConfig, factory=build_hf_text)
