"""Weights in and out: open_clip / Hugging Face CLIP as init_from, and `vlforge export` round trips."""
# ruff: noqa: E501  (recipe text keeps its one-line inline tables)

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlforge.components import BuildContext
from vlforge.errors import UserError
from vlforge.model import build_model
from vlforge.recipe import load_recipe
from vlforge.weights.importing import load_init_weights

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

# A tiny CLIP in open_clip's / OpenAI's layout: a timm *_clip_* ViT and a transformers CLIPTextModel.
CLIP_RECIPE = """
name = "clip_layout"
experiment = "tests"

[model.vision]
type = "timm.vit"
model = "vit_base_patch32_clip_224"
img_size = 32
patch_size = 8
width = 32
depth = 2
heads = 2
embed_dim = 16

[model.text]
type = "hf.text"
config = { model_type = "clip_text_model", hidden_size = 24, num_hidden_layers = 2, num_attention_heads = 2, intermediate_size = 96, max_position_embeddings = 16, hidden_act = "gelu" }
tokenizer = "vlforge:shapes"
max_length = 16
pool = "last"
embed_dim = 16

[objectives.contrastive]
type = "clip.infonce"

[data]
type = "synthetic.shapes"
train_size = 256
val_size = 64
test_size = 64

[train]
steps = 2
batch_size = 16
log_every = 1
progress = false
"""
QUICK_GELU = [
    "model.vision.timm_kwargs={act_layer='quick_gelu'}",
    'model.text.config={model_type="clip_text_model", hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, max_position_embeddings=16, hidden_act="quick_gelu"}',
]


def build(path, overrides=()):
    recipe, plugins = load_recipe(path, overrides)
    torch.manual_seed(1)  # other weights than the source's
    return build_model(recipe, plugins, BuildContext(recipe)).eval()


@pytest.fixture
def clip_recipe(write):
    return write("clip_layout.toml", CLIP_RECIPE)


def inputs(vocab: int, eos: int, length: int = 16):
    """(4,3,32,32) images; (4, length) ids ending in ``eos`` then padding 0, and their mask."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    ids = torch.zeros(4, length, dtype=torch.long)
    mask = torch.zeros(4, length, dtype=torch.long)
    for row, n in enumerate([3, 7, 11, 15]):
        ids[row, :n] = torch.randint(5, vocab - 1, (n,), generator=generator)
        ids[row, n] = eos
        mask[row, : n + 1] = 1
    return images, ids, mask


def vlforge_embeddings(model, images, ids, mask):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(ids, mask)


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def tiny_open_clip(vocab: int, **text) -> torch.nn.Module:
    vision = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}
    text_cfg = {"context_length": 16, "vocab_size": vocab, "width": 24, "heads": 2, "layers": 2, **text}
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text_cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.21)
    return model


def test_open_clip_checkpoint_loads_both_towers_projections_and_logit_scale(clip_recipe, tmp_path):
    model = build(clip_recipe)
    vocab = model.text.model.config.vocab_size
    source = tiny_open_clip(vocab)
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
        tmp_path / "epoch_3.pt",
    )
    load_init_weights(model, str(tmp_path / "epoch_3.pt"))
    images, ids, mask = inputs(
        vocab, eos=vocab - 1
    )  # OpenAI's tokenizer: EOT is the highest id (argmax pooling)
    image, text = vlforge_embeddings(model, images, ids, mask)
    with torch.no_grad():
        assert_close(image, source.encode_image(images, normalize=True))
        assert_close(text, source.encode_text(ids, normalize=True))
    assert float(model.objectives.contrastive.logit_scale.detach()) == pytest.approx(3.21)


def test_hf_clip_folder_loads(clip_recipe, tmp_path):
    model = build(clip_recipe, QUICK_GELU)
    vocab = model.text.model.config.vocab_size
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 96,
            "max_position_embeddings": 16,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
        logit_scale_init_value=2.5,
    )
    torch.manual_seed(0)
    source = transformers.CLIPModel(config).eval()
    source.save_pretrained(tmp_path / "hf")
    load_init_weights(model, str(tmp_path / "hf"))
    images, ids, mask = inputs(vocab, eos=3)
    image, text = vlforge_embeddings(model, images, ids, mask)
    with torch.no_grad():
        assert_close(image, F.normalize(hf_features(source.get_image_features(pixel_values=images)), dim=-1))
        assert_close(
            text,
            F.normalize(hf_features(source.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1),
        )
    assert float(model.objectives.contrastive.logit_scale.detach()) == pytest.approx(2.5)


def hf_features(output):
    """transformers 4 returns the projected features, 5 an output object holding them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_import_reports_unknown_and_missing_tensors_by_name(clip_recipe, tmp_path):
    model = build(clip_recipe)
    state = tiny_open_clip(model.text.model.config.vocab_size).state_dict()
    state["visual.attn_pool.query"] = torch.zeros(3)
    del state["ln_final.weight"]
    torch.save(state, tmp_path / "odd.bin")
    with pytest.raises(UserError) as info:
        load_init_weights(model, str(tmp_path / "odd.bin"))
    message = str(info.value)
    assert "map to nothing in vlforge: visual.attn_pool.query" in message
    # the tower tensor the source has no weights for (text.model.[text_model.]final_layer_norm.weight)
    assert "missing from the source: text.model." in message and "final_layer_norm.weight" in message
    wide = tiny_open_clip(model.text.model.config.vocab_size, width=32)
    torch.save(wide.state_dict(), tmp_path / "wide.bin")
    with pytest.raises(UserError, match=r"shapes differ: .*token_embedding.weight \(\d+, 32\) in the source"):
        load_init_weights(model, str(tmp_path / "wide.bin"))
