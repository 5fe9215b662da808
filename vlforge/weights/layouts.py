"""The tensor names of open_clip and Hugging Face CLIP models, mapped onto vlforge's components.

vlforge side (``VLModel.state_dict()``):

* ``vision.vit.*``: a timm ``VisionTransformer`` in CLIP's layout (``*_clip_*`` models:
  ``pre_norm``, a bias-free patch embedding, class token, token pooling);
  ``vision.proj.weight`` (E, D): the bias-free projection.
* ``text.model.*``: a transformers ``CLIPTextModel`` (``text.model.text_model.*`` before
  transformers 5) (``hf.text`` with
  ``config = {model_type = "clip_text_model", ...}`` and ``pool = "last"``, i.e. the EOS
  token when the tokenizer ends every text with it); ``text.proj.weight`` (E, D).
* ``<objective>.logit_scale``: the learnable log logit scale of ``clip.infonce``.

The tables below are the whole mapping; docs/weights.md shows them as a table.
"""

from __future__ import annotations

from vlforge.weights.mapping import (
    Rule,
    fuse_qkv,
    rename,
    reshape_to,
    scalar,
    split_qkv,
    transpose,
    with_prefix,
)

QKV = ("q_proj", "k_proj", "v_proj")

# open_clip VisionTransformer (``visual.``) -> timm VisionTransformer (``vision.vit.``).
_OPEN_CLIP_VIT = [
    rename("conv1.weight", "patch_embed.proj.weight"),
    rename("class_embedding", "cls_token", reshape_to(1, 1, -1), reshape_to(-1)),
    rename("positional_embedding", "pos_embed", lambda t: [t[0][None]], lambda t: [t[0][0]]),
    rename("ln_pre.{p}", "norm_pre.{p}"),
    rename("transformer.resblocks.{i}.ln_1.{p}", "blocks.{i}.norm1.{p}"),
    rename("transformer.resblocks.{i}.attn.in_proj_weight", "blocks.{i}.attn.qkv.weight"),
    rename("transformer.resblocks.{i}.attn.in_proj_bias", "blocks.{i}.attn.qkv.bias"),
    rename("transformer.resblocks.{i}.attn.out_proj.{p}", "blocks.{i}.attn.proj.{p}"),
    rename("transformer.resblocks.{i}.ln_2.{p}", "blocks.{i}.norm2.{p}"),
    rename("transformer.resblocks.{i}.mlp.c_fc.{p}", "blocks.{i}.mlp.fc1.{p}"),
    rename("transformer.resblocks.{i}.mlp.c_proj.{p}", "blocks.{i}.mlp.fc2.{p}"),
    rename("ln_post.{p}", "norm.{p}"),
]

# open_clip text transformer (top level) -> transformers CLIPTextModel (``text.model.text_model.``).
_OPEN_CLIP_TEXT = [
    rename("token_embedding.weight", "embeddings.token_embedding.weight"),
    rename("positional_embedding", "embeddings.position_embedding.weight"),
    rename("transformer.resblocks.{i}.ln_1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    Rule(
        ("transformer.resblocks.{i}.attn.in_proj_weight",),
        tuple(f"encoder.layers.{{i}}.self_attn.{name}.weight" for name in QKV),
        split_qkv,
        fuse_qkv,
    ),
    Rule(
        ("transformer.resblocks.{i}.attn.in_proj_bias",),
        tuple(f"encoder.layers.{{i}}.self_attn.{name}.bias" for name in QKV),
        split_qkv,
        fuse_qkv,
    ),
    rename("transformer.resblocks.{i}.attn.out_proj.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}"),
    rename("transformer.resblocks.{i}.ln_2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    rename("transformer.resblocks.{i}.mlp.c_fc.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    rename("transformer.resblocks.{i}.mlp.c_proj.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    rename("ln_final.{p}", "final_layer_norm.{p}"),
]

# transformers CLIPVisionModel (``vision_model.``) -> timm VisionTransformer.
_HF_VIT = [
    rename("embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
    rename("embeddings.class_embedding", "cls_token", reshape_to(1, 1, -1), reshape_to(-1)),
    rename("embeddings.position_embedding.weight", "pos_embed", lambda t: [t[0][None]], lambda t: [t[0][0]]),
    rename("pre_layrnorm.{p}", "norm_pre.{p}"),  # sic: transformers' spelling
    rename("encoder.layers.{i}.layer_norm1.{p}", "blocks.{i}.norm1.{p}"),
    Rule(
        tuple(f"encoder.layers.{{i}}.self_attn.{name}.{{p}}" for name in QKV),
        ("blocks.{i}.attn.qkv.{p}",),
        fuse_qkv,
        split_qkv,
    ),
    rename("encoder.layers.{i}.self_attn.out_proj.{p}", "blocks.{i}.attn.proj.{p}"),
    rename("encoder.layers.{i}.layer_norm2.{p}", "blocks.{i}.norm2.{p}"),
    rename("encoder.layers.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    rename("encoder.layers.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    rename("post_layernorm.{p}", "norm.{p}"),
]

VISION = "vision.vit."


def text_prefix(model_keys: list[str]) -> str:
    """Where the CLIPTextModel's tensors start: transformers 5 dropped its ``text_model.`` level."""
    nested = any(key.startswith("text.model.text_model.") for key in model_keys)
    return "text.model.text_model." if nested else "text.model."


def open_clip_rules(logit_scale_key: str, text: str) -> list[Rule]:
    """open_clip ``CLIP`` state dict -> vlforge (``logit_scale_key``: the objective's parameter;
    ``text``: where the text tower starts, ``text_prefix(...)``)."""
    return [
        *with_prefix(VISION, with_prefix("visual.", _OPEN_CLIP_VIT, "sources")),
        rename("visual.proj", "vision.proj.weight", transpose, transpose),
        *with_prefix(text, _OPEN_CLIP_TEXT),
        rename("text_projection", "text.proj.weight", transpose, transpose),
        rename("logit_scale", logit_scale_key, scalar, scalar),
    ]


def hf_clip_rules(logit_scale_key: str, text: str) -> list[Rule]:
    """transformers ``CLIPModel`` state dict -> vlforge."""
    return [
        *with_prefix(VISION, with_prefix("vision_model.", _HF_VIT, "sources")),
        rename("visual_projection.weight", "vision.proj.weight"),
        rename("text_model.{rest}", f"{text}{{rest}}"),
        rename("text_projection.weight", "text.proj.weight"),
        rename("logit_scale", logit_scale_key, scalar, scalar),
    ]
