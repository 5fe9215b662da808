"""``albef.fusion``: ALBEF's multimodal encoder, the upper layers of the text BERT plus cross-attention.

ALBEF splits one BERT: layers [0, k) encode the text alone (the ``hf.text``
part with ``num_layers = k``), layers [k, n) become fusion layers that, after
their (bidirectional) self-attention, cross-attend to the image tokens:

    x ← LN(x + SelfAttn(x, text mask))      BERT layer i's weights
    x ← LN(x + CrossAttn(x, image tokens))   new, BERT initialisation N(0, 0.02)
    x ← LN(x + FFN(x))                       BERT layer i's weights

These are modules of our own that take over the BERT layer's weights:
transformers' ``BertLayer`` only accepts cross-attention as a decoder, which
makes its self-attention causal. The MLM head (BERT's ``cls.predictions``:
dense + activation + LayerNorm, then the word embeddings as decoder plus a
bias) lives here too, so the momentum teacher copies it with the fusion layers;
the decoder weight stays tied to the text encoder's word embeddings by being
passed in at call time.

Shapes: B batch, L text length, T image tokens, D text width, Dv image width, N scored tokens, V vocab.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

MLM_HEAD_PREFIX = "cls.predictions."


class Attention(nn.Module):
    """BERT's post-norm attention block: x ← LN(x + Dropout(Dense(MultiHead(x, context))))."""

    def __init__(
        self,
        query: nn.Linear,
        key: nn.Linear,
        value: nn.Linear,
        dense: nn.Linear,
        norm: nn.LayerNorm,
        heads: int,
        attention_dropout: float,
        hidden_dropout: float,
    ) -> None:
        super().__init__()
        self.query, self.key, self.value, self.dense, self.norm = query, key, value, dense, norm
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.dropout = nn.Dropout(hidden_dropout)

    @classmethod
    def new(cls, width: int, context_width: int, config: Any) -> Attention:
        """Freshly initialised (BERT's init) attention from ``width`` queries to ``context_width`` keys."""
        block = cls(
            nn.Linear(width, width),
            nn.Linear(context_width, width),
            nn.Linear(context_width, width),
            nn.Linear(width, width),
            nn.LayerNorm(width, eps=config.layer_norm_eps),
            config.num_attention_heads,
            config.attention_probs_dropout_prob,
            config.hidden_dropout_prob,
        )
        block.apply(lambda module: bert_init(module, config.initializer_range))
        return block

    @classmethod
    def from_bert(cls, attention: nn.Module, config: Any) -> Attention:
        """Take over a ``BertAttention``'s modules (its weights, not copies)."""
        return cls(
            attention.self.query,
            attention.self.key,
            attention.self.value,
            attention.output.dense,
            attention.output.LayerNorm,
            config.num_attention_heads,
            config.attention_probs_dropout_prob,
            config.hidden_dropout_prob,
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B,L,D), context (B,S,Dc), mask (B,1,1,S) bool True = attend -> (B,L,D)."""
        batch, length, width = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B,S,D) -> (B,H,S,D/H)
            return t.view(batch, t.shape[1], self.heads, width // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split_heads(self.query(x)),
            split_heads(self.key(context)),
            split_heads(self.value(context)),
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )  # (B,H,L,D/H)
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        return self.norm(x + self.dropout(self.dense(attended)))


class FusionLayer(nn.Module):
    """One fusion layer: bidirectional self-attention, cross-attention to the image, feed-forward."""

    def __init__(self, bert_layer: nn.Module, image_width: int, config: Any) -> None:
        super().__init__()
        self.self_attention = Attention.from_bert(bert_layer.attention, config)
        self.cross_attention = Attention.new(config.hidden_size, image_width, config)
        # BertIntermediate (dense + activation) and BertOutput (dense, dropout, residual LN), as they are.
        self.intermediate = bert_layer.intermediate
        self.output = bert_layer.output

    def forward(self, x: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """x (B,L,D), text_mask (B,1,1,L) bool, image_tokens (B,T,Dv) -> (B,L,D)."""
        x = self.self_attention(x, x, text_mask)
        x = self.cross_attention(x, image_tokens)  # every image token is real: no mask
        return self.output(self.intermediate(x), x)


class BertFusion(nn.Module):
    """Fusion layers over text tokens and image tokens, plus the MLM head."""

    def __init__(
        self,
        bert_layers: list[nn.Module],
        image_width: int,
        config: Any,
        mlm_head: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.width = config.hidden_size
        self.gradient_checkpointing = gradient_checkpointing
        self.layers = nn.ModuleList(FusionLayer(layer, image_width, config) for layer in bert_layers)
        self.mlm_transform: nn.Module | None = None
        self.mlm_bias: nn.Parameter | None = None
        if mlm_head:
            self.mlm_transform = BertPredictionHeadTransform(config)
            self.mlm_transform.apply(lambda module: bert_init(module, config.initializer_range))
            self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def shard_units(self) -> list[nn.Module]:
        """FSDP/compile units (``ShardUnitsLike``): the fusion layers (the MLM head stays with the root)."""
        return list(self.layers)

    def forward(
        self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """text_tokens (B,L,D), attention_mask (B,L) 1 = real token, image_tokens (B,T,Dv) -> (B,L,D)."""
        text_mask = attention_mask[:, None, None, :].bool()  # (B,1,1,L)
        x = text_tokens
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, text_mask, image_tokens, use_reentrant=False)
            else:
                x = layer(x, text_mask, image_tokens)
        return x

    def mlm_logits(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden (N,D), the text encoder's word embeddings (V,D) as the tied decoder -> (N,V) fp32.

        The decoder runs in fp32 even under autocast: these logits feed the
        distillation softmax.
        """
        if self.mlm_transform is None:
            raise RuntimeError("albef.fusion was built with mlm_head = false")
        transformed = self.mlm_transform(hidden)  # (N,D)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(transformed.float(), word_embeddings.float(), self.mlm_bias.float())

    def load_mlm_head(self, folder: str) -> bool:
        """Load BERT's ``cls.predictions`` head from a pretrained folder; False if it has none."""
        state = _read_weights(Path(folder))
        head = {k.removeprefix(MLM_HEAD_PREFIX): v for k, v in state.items() if k.startswith(MLM_HEAD_PREFIX)}
        if not head or self.mlm_transform is None:
            return False
        transform = {k.removeprefix("transform."): v for k, v in head.items() if k.startswith("transform.")}
        self.mlm_transform.load_state_dict(transform)
        with torch.no_grad():
            self.mlm_bias.copy_(head["bias"])
        return True


def bert_init(module: nn.Module, std: float) -> None:
    """BERT's initialisation: Linear N(0, std) with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {}
