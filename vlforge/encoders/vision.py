"""``timm.vit``: a timm VisionTransformer with its token stage exposed.

The wrapper calls timm's own modules and methods (``patch_embed``,
``_pos_embed``, ``norm_pre``, ``blocks``, ``norm``, ``pool``) in timm's order,
split where a masking component needs to drop tokens, so FLIP-style masking
works on any timm ViT without a fork of timm code.

Shapes: B batch, N patches, P prefix (CLS/register) tokens, T tokens, D width,
E joint embedding width.
"""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.models import checkpoint_seq, load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from vlforge.components import VisionOutput

if TYPE_CHECKING:
    from collections.abc import Callable

    from vlforge.encoders import TimmViTConfig


class TimmViT(nn.Module):
    """A timm ``VisionTransformer`` (no classifier) plus an optional bias-free projection."""

    def __init__(self, vit: VisionTransformer, embed_dim: int = 0) -> None:
        super().__init__()
        self.vit = vit
        self.width = vit.embed_dim
        self.embed_dim = embed_dim
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.image_size = vit.patch_embed.img_size[0]
        self.data_config = _data_config(vit)
        self.proj = nn.Linear(self.width, embed_dim, bias=False) if embed_dim else None

    def shard_units(self) -> list[nn.Module]:
        """FSDP/compile units (``ShardUnitsLike``): the transformer blocks."""
        return list(self.vit.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B, P+N, D): patches + position embeddings, prefix tokens prepended."""
        x = self.vit.patch_embed(images)
        x = self.vit._pos_embed(x)
        # Per-token LayerNorm (CLIP's ln_pre), so applying it before or after dropping is the same.
        return self.vit.norm_pre(x)

    def blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,T,D) -> (B,T,D): the transformer blocks and the final norm."""
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.vit.blocks, tokens, use_reentrant=False)
        else:
            x = self.vit.blocks(tokens)
        return self.vit.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,T,D) -> (B,D): CLS token or average, as timm pools (fc_norm is identity unless asked for)."""
        return self.vit.fc_norm(self.vit.pool(tokens))

    def project(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """(B,D) -> (B,E) L2-normalised, or None without a projection."""
        if self.proj is None:
            return None
        return F.normalize(self.proj(pooled), dim=-1)

    def forward(
        self,
        images: torch.Tensor,
        masking: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> VisionOutput:
        tokens = self.embed(images)  # (B, P+N, D)
        if masking is not None:
            tokens = masking(tokens, self.num_prefix_tokens)  # (B, P+K, D)
        tokens = self.blocks(tokens)
        pooled = self.pool(tokens)
        return VisionOutput(tokens=tokens, pooled=pooled, embedding=self.project(pooled))


def build_timm_vit(config: TimmViTConfig, meta: bool = False) -> TimmViT:
    """Build from a ``timm.vit`` config; on the meta device nothing is allocated or loaded."""
    with torch.device("meta") if meta else contextlib.nullcontext():
        vit = _create(config)
        if config.pretrained and not meta:
            load_timm_weights(vit, config.pretrained)
        if config.pos_embed == "sincos":
            use_sincos_pos_embed(vit)
        vit.set_grad_checkpointing(config.gradient_checkpointing)
        return TimmViT(vit, config.embed_dim)


def _create(config: TimmViTConfig) -> VisionTransformer:
    if not timm.is_model(config.model):
        close = difflib.get_close_matches(config.model, timm.list_models(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"timm.vit: unknown timm model '{config.model}'{hint}")
    overrides = {
        "img_size": config.img_size,
        "patch_size": config.patch_size,
        "embed_dim": config.width,
        "depth": config.depth,
        "num_heads": config.heads,
        "mlp_ratio": config.mlp_ratio,
    }
    kwargs: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    if config.pool == "avg":
        # timm would move the final norm after pooling; keep it on the tokens (FLIP, and what
        # fusion modules reading VisionOutput.tokens expect). timm_kwargs may say otherwise.
        kwargs["fc_norm"] = False
    kwargs |= config.timm_kwargs
    try:
        vit = timm.create_model(
            config.model, pretrained=False, num_classes=0, global_pool=config.pool, **kwargs
        )
    except (AssertionError, TypeError, ValueError) as exc:  # timm checks its arguments with asserts
        raise ValueError(
            f"timm.vit could not build '{config.model}' with {kwargs} (it needs a timm VisionTransformer): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"timm.vit needs a timm VisionTransformer; '{config.model}' is a {type(vit).__name__}"
        )
    return vit


def load_timm_weights(vit: VisionTransformer, path: str) -> None:
    """Load a weights file into ``vit``: every trunk tensor must fit; a classifier head is dropped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"timm.vit: pretrained weights file not found: {path}")
    vit.load_state_dict(fitted_state(vit, load_state_dict(path), path), strict=False)


def fitted_state(
    vit: VisionTransformer, state: dict[str, torch.Tensor], path: str
) -> dict[str, torch.Tensor]:
    """``state`` in ``vit``'s layout; raises ValueError naming what does not fit.

    timm's ViT checkpoint filter converts known layouts (OpenAI/open_clip CLIP,
    DINOv2, ...) and resamples position and patch embeddings to this model.
    Works on meta tensors too, so ``pretrained_problem`` checks shapes without
    reading weights.
    """
    state = checkpoint_filter_fn(state, vit, adapt_layer_scale=True)
    classifiers = vit.pretrained_cfg.get("classifier") or "head"
    heads = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    state = {key: value for key, value in state.items() if key.split(".")[0] not in heads}
    own = vit.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    resized = [
        f"{key} {tuple(value.shape)} in the file, {tuple(own[key].shape)} in the model"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    found = [
        f"{what} {_first(keys, count)}"
        for what, keys, count in [
            ("other shapes", resized, 3),
            ("missing", missing, 8),
            ("unexpected", unexpected, 8),
        ]
        if keys
    ]
    if found:
        raise ValueError(
            f"{path} does not fit {vit.pretrained_cfg.get('architecture', 'the model')}: {'; '.join(found)}"
        )
    return state


def pretrained_problem(config: TimmViTConfig) -> str | None:
    """Why ``config.pretrained`` cannot load into the configured model, from shapes alone; None if it fits.

    The model is built on the meta device and the file's tensors are read as
    shapes (a safetensors header, or a torch file mapped to the meta device), so
    this takes a moment whatever the file's size.
    """
    with torch.device("meta"):
        vit = _create(config)
    try:
        state = _shapes_of(config.pretrained)
    except Exception as exc:  # any reader's failure means the same to the user: not a weights file
        return f"cannot read {config.pretrained} as weights: {type(exc).__name__}: {exc}"
    try:
        fitted_state(vit, state, config.pretrained)
    except ValueError as exc:
        return str(exc)
    return None


def _shapes_of(path: str) -> dict[str, torch.Tensor]:
    """A weights file's tensors as meta tensors of their shapes (nothing is read beyond the header)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as weights:
            names = weights.keys()  # safe_open is no mapping: it has keys() but no iteration
            return {key: torch.empty(weights.get_slice(key).get_shape(), device="meta") for key in names}
    return load_state_dict(path, device="meta")


def _first(keys: list[str], n: int = 8) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return f"[{', '.join(keys[:n])}]{more}"


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(H*W, dim) fixed 2-D sin-cos position table, in FLIP's (and MAE's) layout.

    Row-major over the grid; columns [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)]
    with x the column and y the row index and ω_k = 10000^(-k/(dim/4)).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    height, width = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    x = x.reshape(-1, 1) * omega  # (H*W, dim/4)
    y = y.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def use_sincos_pos_embed(vit: VisionTransformer) -> None:
    """Replace the learned position embedding by a fixed sin-cos table (not trained).

    Prefix tokens get a zero row when the table has one for them: FLIP adds no
    position to its CLS token.
    """
    if vit.pos_embed is None:
        raise ValueError("pos_embed = 'sincos' needs a model with absolute position embeddings")
    table = sincos_2d(vit.patch_embed.grid_size, vit.embed_dim).to(vit.pos_embed)  # (N, D)
    prefix = vit.pos_embed.shape[1] - table.shape[0]  # 0 with timm's no_embed_class, else P
    with torch.no_grad():
        vit.pos_embed.copy_(torch.cat([table.new_zeros(prefix, table.shape[1]), table])[None])
    vit.pos_embed.requires_grad_(False)


def _data_config(vit: VisionTransformer) -> dict[str, Any]:
    """timm's preprocessing config, with the input size this model was built for."""
    config = resolve_model_data_config(vit)
    # The pretrained config keeps the registered size even when img_size is overridden.
    config["input_size"] = (vit.in_chans, *vit.patch_embed.img_size)
    return config
