"""``hf.text``: a transformers model (``AutoModel``) and its tokenizer as a text tower.

Everything is read from local files: a pretrained folder, or a config table
plus a tokenizer spec (``vlforge.data.tokenizers.load_tokenizer``).

Shapes: B batch, L text length, D width, E joint embedding width.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

from vlforge.components import TextOutput
from vlforge.data.tokenizers import load_tokenizer

if TYPE_CHECKING:
    from vlforge.encoders import HFTextConfig


class HFText(nn.Module):
    """A transformers model's last hidden states, pooled, optionally projected (TextEncoderLike)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int,
        pool: str,
        embed_dim: int = 0,
        removed_layers: list[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # Layers cut off by ``num_layers``: not run, trained or saved here; a fusion module may take them.
        self.removed_layers = removed_layers or []
        self.tokenizer = tokenizer
        self.width = model.config.hidden_size
        self.embed_dim = embed_dim
        self.max_length = max_length
        self.pool_type = pool
        self.proj = nn.Linear(self.width, embed_dim, bias=False) if embed_dim else None
        self.causal = (
            getattr(model.config, "is_decoder", False)
            or model.config.model_type in CAUSAL_MODEL_TYPES
            or any(getattr(module, "is_causal", False) for module in model.modules())
        )

    def shard_units(self) -> list[nn.Module]:
        """FSDP/compile units (``ShardUnitsLike``): the transformer layers that run here."""
        return list(_layer_stack(self.model))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> ``input_ids``/``attention_mask`` (B, L): padded to the longest, cut at max_length."""
        encoded = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,L,D), (B,L) -> (B,D)."""
        if self.pool_type == "first":
            return tokens[:, 0]
        if self.pool_type == "mean":
            mask = attention_mask.to(tokens.dtype)[..., None]  # (B,L,1)
            return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
        # "last": the highest position holding a real token, whichever side the padding is on.
        # Integer positions: a bf16 position would round beyond 256.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)  # (B,)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]

    def project(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """(B,D) -> (B,E) L2-normalised, or None without a projection."""
        if self.proj is None:
            return None
        return F.normalize(self.proj(pooled), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        mask = prepared_mask(attention_mask, self.model.config._attn_implementation, self.causal)
        tokens = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B,L,D)
        pooled = self.pool(tokens, attention_mask)
        return TextOutput(
            tokens=tokens, pooled=pooled, embedding=self.project(pooled), attention_mask=attention_mask
        )


# Text models whose forward makes its own causal mask from the 2-D padding mask (transformers'
# create_causal_mask) although no attention module says ``is_causal``: a prepared mask must
# then carry the causal pattern itself, since transformers takes a 4-D mask as it is.
CAUSAL_MODEL_TYPES = frozenset({"clip_text_model"})


def prepared_mask(attention_mask: torch.Tensor, implementation: str, causal: bool) -> torch.Tensor:
    """(B,L) padding mask -> the 4-D mask transformers uses as it is, for SDPA and eager attention.

    Given a 2-D mask, transformers first asks whether it holds any padding
    (``mask.all()``, a host-device sync every step) to skip the mask when not.
    A prepared mask skips that question: (B,1,1,L) bool for SDPA, an additive
    fp32 bias for eager, (B,1,L,L) with the causal pattern for decoder models.
    Other implementations (flash attention) take the 2-D mask.
    """
    if implementation not in ("sdpa", "eager"):
        return attention_mask
    allowed = attention_mask.bool()[:, None, None, :]  # (B,1,1,L)
    if causal:
        length = attention_mask.shape[1]
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=allowed.device).tril()
    if implementation == "sdpa":
        return allowed
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(torch.float32).min)


def build_hf_text(config: HFTextConfig, meta: bool = False) -> HFText:
    """Build from an ``hf.text`` config; on the meta device no weights are allocated or read."""
    tokenizer = load_tokenizer(config.tokenizer or config.pretrained)
    with torch.device("meta") if meta else contextlib.nullcontext():
        if config.pretrained and not meta:
            model = AutoModel.from_pretrained(config.pretrained, local_files_only=True)
        else:
            model = AutoModel.from_config(_hf_config(config, tokenizer))
        # We pool ourselves; an unused pooler would hold parameters without gradients, which DDP refuses.
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ValueError(
                f"hf.text: the tokenizer has {len(tokenizer)} tokens, the model's vocabulary {vocab}"
            )
        removed = keep_first_layers(model, config.num_layers) if config.num_layers else []
        if config.gradient_checkpointing:
            enable_checkpointing(model)
        return HFText(model, tokenizer, config.max_length, config.pool, config.embed_dim, removed)


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing of every layer, non-reentrant (active in training only)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _hf_config(config: HFTextConfig, tokenizer: Any) -> Any:
    """The transformers config: the pretrained folder's, or one made from the recipe's table."""
    if config.pretrained:
        return AutoConfig.from_pretrained(config.pretrained, local_files_only=True)
    options = dict(config.config or {})
    options.setdefault("vocab_size", len(tokenizer))
    options.setdefault("pad_token_id", tokenizer.pad_token_id)
    # Models that pool by token id (CLIPTextModel's own pooler) need the tokenizer's ids, not their defaults.
    options.setdefault("bos_token_id", tokenizer.bos_token_id or tokenizer.cls_token_id)
    options.setdefault("eos_token_id", tokenizer.eos_token_id or tokenizer.sep_token_id)
    return AutoConfig.for_model(options.pop("model_type"), **options)


# Where transformers text models keep their layer stack: BERT/RoBERTa, CLIP (transformers 5 and 4),
# DistilBERT, GPT-2, LLaMA-style.
LAYER_STACKS = (
    "encoder.layer",
    "encoder.layers",
    "text_model.encoder.layers",
    "transformer.layer",
    "h",
    "layers",
)


def keep_first_layers(model: nn.Module, count: int) -> list[nn.Module]:
    """Cut ``model``'s layer stack to its first ``count`` layers; returns the removed ones in order."""
    stack = _layer_stack(model)
    if count > len(stack):
        raise ValueError(f"hf.text: num_layers = {count} but the model has {len(stack)} layers")
    removed = list(stack[count:])
    del stack[count:]
    model.config.num_hidden_layers = count
    return removed


def _layer_stack(model: nn.Module) -> nn.ModuleList:
    for path in LAYER_STACKS:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList):
            return stack
    raise ValueError(f"hf.text: num_layers needs a layer stack at one of {LAYER_STACKS}")
