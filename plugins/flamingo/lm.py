"""The fusion component: a frozen Hugging Face causal LM with GATED XATTN-DENSE blocks.

The LM is not forked or wrapped: a gated block runs in a forward pre-hook of
decoder layer i whenever (i+1) % N == 0 (OpenFlamingo's placement: before
the frozen layer), reading the media and text times that ``FlamingoLM.forward``
holds for the duration of one call. Called directly (``fusion.lm(...)``), the
LM is the plain frozen LM. The blocks live in ``FlamingoLM.xattn``, so the
LM's own state-dict keys stay those of the checkpoint.

With ``gradient_checkpointing``, transformers checkpoints each decoder
layer's ``forward`` (its module hooks run outside, so the gated block is not
replayed from stale state) and each gated block is checkpointed separately
with its media and text times as explicit inputs.

Shapes: B batch, L text length, T media, n latents per medium, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from vlforge_plugins.flamingo import SHAPES_TOKENIZER
from vlforge_plugins.flamingo.xattn import GatedCrossAttentionBlock, text_time

from vlforge.encoders.text import enable_checkpointing
from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge_plugins.flamingo import GatedXAttnConfig

    from vlforge.components import BuildContext
    from vlforge.engine import TrainState

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"

# Where each supported family keeps its decoder layers.
DECODER_LAYERS = {
    "GPT-2 / GPT-J": "transformer.h",
    "OPT": "model.decoder.layers",
    "GPT-NeoX / Pythia / RedPajama": "gpt_neox.layers",
    "LLaMA": "model.layers",
    "MPT": "transformer.blocks",
}


def find_decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's list of decoder layers; a clear error for an unknown layout."""
    for path in DECODER_LAYERS.values():
        with contextlib.suppress(AttributeError):
            layers = attrgetter(path)(lm)
            if isinstance(layers, nn.ModuleList):
                return layers
    known = ", ".join(f"{family}: {path}" for family, path in DECODER_LAYERS.items())
    raise ValueError(f"flamingo: cannot find the decoder layers of {type(lm).__name__} (known: {known})")


def xattn_layer_indices(num_layers: int, every: int) -> list[int]:
    """Decoder layers preceded by a gated block: i with (i+1) % every == 0."""
    return [i for i in range(num_layers) if (i + 1) % every == 0]


@dataclass
class FlamingoOutput:
    logits: torch.Tensor  # (B,L,V)
    past_key_values: Any  # the LM's cache when use_cache, else None
    text_time: torch.Tensor  # (B,L) images seen up to each position (the last column continues a cache)


class FlamingoLM(nn.Module):
    """``fusion(input_ids, attention_mask, media)`` -> next-token logits conditioned on media.

    Trainable: the gated blocks and, with ``train_embeddings``, the rows of
    ``<image>`` and ``<|endofchunk|>`` in the input embedding (the gradient of
    every other row is zeroed after backward). Everything else is frozen.
    """

    def __init__(
        self,
        lm: nn.Module,
        tokenizer: Any,
        media_dim: int,
        *,
        every: int = 1,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        only_immediate: bool = True,
        train_embeddings: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.lm = lm.requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(END_OF_CHUNK)
        self.gradient_checkpointing = gradient_checkpointing
        width = lm.get_input_embeddings().embedding_dim
        layers = find_decoder_layers(lm)
        self.xattn_layers = xattn_layer_indices(len(layers), every)
        self.xattn = nn.ModuleList(
            GatedCrossAttentionBlock(
                width,
                media_dim,
                heads=heads,
                dim_head=dim_head,
                ff_mult=ff_mult,
                only_immediate=only_immediate,
            )
            for _ in self.xattn_layers
        )
        for block, index in zip(self.xattn, self.xattn_layers):
            layers[index].register_forward_pre_hook(partial(self._before_layer, block), with_kwargs=True)
        self._media: tuple[torch.Tensor, torch.Tensor] | None = None  # (media, text times) during forward
        embedding = lm.get_input_embeddings().weight
        frozen_rows = torch.ones(embedding.shape[0], dtype=torch.bool, device=embedding.device)
        frozen_rows[[self.image_token_id, self.end_of_chunk_token_id]] = False
        self.register_buffer("frozen_rows", frozen_rows, persistent=False)  # (V,)
        embedding.requires_grad_(train_embeddings)
        if gradient_checkpointing:
            enable_lm_checkpointing(lm, layers)

    def pretrained_parameters(self) -> list[str]:
        """The LM's weights: its path or its seeded config rebuilds them (``PretrainedLike``)."""
        return [f"lm.{name}" for name, _ in self.lm.named_parameters(remove_duplicate=False)]

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: torch.Tensor,
        *,
        image_offset: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> FlamingoOutput:
        """ids (B,L), mask (B,L') with L' = cached + L, media (B,T,n,d_v) -> logits (B,L,V).

        ``image_offset`` (B,): images already seen in the cached prefix; the
        new tokens continue its text times (cached-media generation).
        """
        times = text_time(input_ids, self.image_token_id, image_offset)  # (B,L)
        extra = {} if position_ids is None else {"position_ids": position_ids}
        self._media = (media, times)
        try:
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **extra,
            )
        finally:
            self._media = None
        return FlamingoOutput(out.logits, out.past_key_values if use_cache else None, times)

    def _before_layer(
        self, block: GatedCrossAttentionBlock, layer: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """Forward pre-hook: hidden states -> block(hidden states); a no-op outside ``forward``."""
        if self._media is None:
            return None
        media, times = self._media
        run = block
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            run = partial(checkpoint, block, use_reentrant=False)
        if args:  # every supported family passes the hidden states first, positionally
            return (run(args[0], media, times), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": run(kwargs["hidden_states"], media, times)}

    # ------------------------------------------------------------------ training helpers

    def mask_embedding_grad(self) -> None:
        """Zero the gradient of every input-embedding row but ``<image>`` and ``<|endofchunk|>``."""
        grad = self.lm.get_input_embeddings().weight.grad  # (V, D), or this rank's rows of it under FSDP
        if grad is None:
            return
        rows = self.frozen_rows  # (V,)
        if hasattr(grad, "to_local"):  # a DTensor: mask the rows this rank holds
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            mesh, placements = grad.device_mesh, grad.placements
            shape, offset = compute_local_shape_and_global_offset(grad.shape, mesh, placements)
            grad, rows = grad.to_local(), rows[offset[0] : offset[0] + shape[0]]
        grad.masked_fill_(rows[:, None], 0)  # no boolean indexing: no host sync

    @hookimpl
    def vlforge_after_backward(self, state: TrainState) -> None:
        self.mask_embedding_grad()

    def shard_units(self) -> list[nn.Module]:
        """FSDP/compile units (``ShardUnitsLike``): each decoder layer and each gated block.

        The tied input/output embeddings stay outside every unit, with the root: one unit.
        """
        return [*find_decoder_layers(self.lm), *self.xattn]


def enable_lm_checkpointing(lm: nn.Module, layers: nn.ModuleList) -> None:
    """transformers' activation checkpointing, refused where it would replay our hooks.

    Recent transformers checkpoint a decoder layer's wrapped ``forward`` and
    leave module hooks outside; older ones checkpoint ``__call__``, which
    would run the gated block again in backward after ``forward`` returned.
    """
    if not hasattr(type(layers[0]).forward, "__wrapped__"):
        raise ValueError(
            f"flamingo: gradient_checkpointing needs a transformers version that checkpoints "
            f"{type(layers[0]).__name__}.forward (module hooks outside the checkpoint); upgrade transformers"
        )
    enable_checkpointing(lm)


# --------------------------------------------------------------------------- building


def prepare_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` with ``<image>``, ``<|endofchunk|>`` and (if missing) pad/eos tokens."""
    tokenizer = copy.deepcopy(tokenizer)  # loaders cache tokenizers; never edit a shared one
    added: dict[str, Any] = {"additional_special_tokens": [END_OF_CHUNK, IMAGE_TOKEN]}
    if tokenizer.pad_token is None:
        added["pad_token"] = "<PAD>"
    if tokenizer.eos_token is None:
        added["eos_token"] = tokenizer.sep_token or "<|endoftext|>"
    tokenizer.add_special_tokens(added)
    return tokenizer


def load_tokenizer(spec: str) -> Any:
    """``flamingo:shapes`` (built here), ``vlforge:<vocab>`` or a local folder, with Flamingo's tokens."""
    if spec == SHAPES_TOKENIZER:
        from vlforge_plugins.flamingo.data import shapes_tokenizer

        return prepare_tokenizer(shapes_tokenizer())
    from vlforge.data.tokenizers import load_tokenizer as load_core_tokenizer

    return prepare_tokenizer(load_core_tokenizer(spec))


def load_causal_lm(config: GatedXAttnConfig, tokenizer: Any, meta: bool) -> nn.Module:
    """The LM from a local folder or a config table, its vocabulary large enough for ``tokenizer``.

    A config table's ``vocab_size`` and special token ids default to the
    tokenizer's. On the meta device nothing is read but the folder's config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab_size = len(tokenizer)

    if config.lm and not meta:
        lm = AutoModelForCausalLM.from_pretrained(config.lm, local_files_only=True)
        if vocab_size > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(vocab_size)
        return with_sync_free_mask(lm)
    if config.lm:
        hf_config = AutoConfig.from_pretrained(config.lm, local_files_only=True)
    else:
        options = dict(config.lm_config or {})
        options.setdefault("vocab_size", vocab_size)
        for token in ("bos", "eos", "pad"):
            options.setdefault(f"{token}_token_id", getattr(tokenizer, f"{token}_token_id"))
        hf_config = AutoConfig.for_model(options.pop("model_type"), **options)
    hf_config.vocab_size = max(getattr(hf_config, "vocab_size", 0) or 0, vocab_size)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return with_sync_free_mask(AutoModelForCausalLM.from_config(hf_config))


# SDPA attention whose causal mask is always built from the 2-D padding mask.
SYNC_FREE_SDPA = "vlforge_sdpa_always_masked"


def with_sync_free_mask(lm: nn.Module) -> nn.Module:
    """Run ``lm``'s SDPA attention without transformers' per-step host sync.

    Given a 2-D padding mask, transformers asks whether it holds any padding
    (``mask.all()``, a host-device sync every forward) to hand SDPA ``is_causal``
    instead of a mask. This registers the same SDPA attention under a name whose
    mask function never asks, so the mask is always built (batches with padding
    build it anyway). Passing a prepared 4-D mask instead, as the text towers do,
    would not do: OPT and others derive positions from the 2-D mask. Logits are
    unchanged (bitwise on CPU). Other implementations (eager, flash) are left alone.
    """
    if lm.config._attn_implementation != "sdpa":
        return lm
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def always_masked(*args: Any, **kwargs: Any) -> Any:  # the caller passes its own skip flag
        return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})

    AttentionInterface.register(SYNC_FREE_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(SYNC_FREE_SDPA, always_masked)
    lm.set_attn_implementation(SYNC_FREE_SDPA)
    return lm


def build_flamingo_lm(config: GatedXAttnConfig, ctx: BuildContext) -> FlamingoLM:
    adapter = ctx.parts.get("adapter")
    if adapter is None or not hasattr(adapter, "width"):
        raise ValueError("flamingo.gated_xattn needs [model.adapter] (e.g. type = 'flamingo.perceiver')")
    tokenizer = load_tokenizer(config.tokenizer or config.lm)
    lm = load_causal_lm(config, tokenizer, ctx.meta)
    with torch.device("meta") if ctx.meta else contextlib.nullcontext():
        fusion = FlamingoLM(
            lm,
            tokenizer,
            adapter.width,
            every=config.every,
            heads=config.heads,
            dim_head=config.dim_head,
            ff_mult=config.ff_mult,
            only_immediate=config.only_immediate_media,
            train_embeddings=config.train_embeddings,
            gradient_checkpointing=config.gradient_checkpointing,
        )
    if config.train_embeddings and ctx.recipe is not None:
        check_embedding_not_decayed(fusion, ctx.recipe.optim)
    return fusion


def check_embedding_not_decayed(fusion: FlamingoLM, optim: Any) -> None:
    """Refuse weight decay on a partly trained embedding.

    Only two rows get gradients, but AdamW's decoupled weight decay would
    shrink every frozen row at every step; the embedding must be matched by
    ``optim.no_decay`` (parameter names are substrings-matched by the engine).
    """
    weight = fusion.lm.get_input_embeddings().weight
    name = "fusion." + next(n for n, p in fusion.named_parameters() if p is weight)
    if optim.weight_decay and not any(pattern in name for pattern in optim.no_decay):
        raise ValueError(
            f"flamingo.gated_xattn trains the <image>/<|endofchunk|> rows of '{name}', but weight decay "
            f"{optim.weight_decay} would shrink its frozen rows: add '{name.rsplit('.', 1)[0]}' to "
            f"optim.no_decay (or set train_embeddings = false)"
        )
