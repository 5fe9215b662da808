"""Weights in and out: open_clip / Hugging Face CLIP as init_from, and `vlforge export` round trips."""
# ruff: noqa: E501  (recipe text keeps its one-line inline tables)

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlforge.checkpoint import latest_checkpoint
from vlforge.cli import main
from vlforge.components import BuildContext
from vlforge.errors import UserError
from vlforge.model import build_model
from vlforge.recipe import load_recipe
from vlforge.resources import shipped_recipes
from vlforge.weights.importing import load_init_weights

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

# The shipped clip_tiny (open_clip's / OpenAI's layout: a timm *_clip_* ViT and a transformers
# CLIPTextModel), narrower still.
CLIP_RECIPE = f"""
extends = "{shipped_recipes()["clip_tiny"]}"
name = "clip_layout"
experiment = "tests"
delete = ["evaluators"]

[model]
vision = {{ patch_size = 8, width = 32, depth = 2, heads = 2, embed_dim = 16 }}
text = {{ embed_dim = 16, config = {{ model_type = "clip_text_model", hidden_size = 24, num_hidden_layers = 2, num_attention_heads = 2, intermediate_size = 96, max_position_embeddings = 16, hidden_act = "gelu" }} }}

[data]
train_size = 256
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
    with pytest.raises(UserError, match="activations differ: model.vision uses gelu, the source quick_gelu"):
        load_init_weights(build(clip_recipe), str(tmp_path / "hf"))  # weights alone cannot tell
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


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    """A run of the shipped clip_tiny recipe, two steps at toy size."""
    root = tmp_path_factory.mktemp("runs")
    overrides = [
        "train.steps=2",
        "train.batch_size=16",
        "data.train_size=64",
        "~evaluators",
        "train.progress=false",
    ]
    assert main(["run", "clip_tiny", "--runs-root", str(root), *overrides]) == 0
    (run_dir,) = root.glob("quickstart/*")
    return run_dir


def vlforge_reference(run_dir):
    from vlforge.weights.export import load_trained

    _, model = load_trained(str(run_dir))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = model.text.tokenize(
        ["a red circle", "a large blue square at the top left", "green", "a small star"]
    )
    image, text = vlforge_embeddings(model, images, tokens["input_ids"], tokens["attention_mask"])
    return model, images, tokens, image, text


def test_export_hf_clip_loads_in_transformers(trained_clip, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(trained_clip), "--format", "hf-clip", "-o", str(out)]) == 0
    model, images, tokens, image, text = vlforge_reference(trained_clip)
    clip = transformers.CLIPModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert_close(F.normalize(hf_features(clip.get_image_features(pixel_values=images)), dim=-1), image)
        hf_text = clip.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        assert_close(F.normalize(hf_features(hf_text), dim=-1), text)
    assert float(clip.logit_scale.detach()) == pytest.approx(
        float(model.objectives.contrastive.logit_scale.detach())
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer("a red circle")["input_ids"]
        == model.text.tokenize(["a red circle"])["input_ids"][0].tolist()
    )
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32}
    assert processor["image_mean"] == list(model.vision.data_config["mean"])
    assert processor["resample"] == 3  # bicubic


def test_export_open_clip_loads_in_open_clip(trained_clip, tmp_path):
    out = tmp_path / "oc"
    checkpoint = latest_checkpoint(str(trained_clip))  # a checkpoint, not its run, this time
    assert main(["export", checkpoint, "--format", "open_clip", "-o", str(out)]) == 0
    model, images, tokens, image, text = vlforge_reference(trained_clip)
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    clip.eval()
    length = clip.positional_embedding.shape[0]  # open_clip adds every position: pad to the context
    ids = F.pad(tokens["input_ids"], (0, length - tokens["input_ids"].shape[1]))
    with torch.no_grad():
        assert_close(clip.encode_image(images, normalize=True), image)
        assert_close(clip.encode_text(ids, normalize=True), text)
    assert float(clip.logit_scale.detach()) == pytest.approx(
        float(model.objectives.contrastive.logit_scale.detach())
    )
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    assert torch.equal(tokenizer(["a red circle"])[0], ids[0])
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["interpolation"] == "bicubic"
    assert config["preprocess_cfg"]["mean"] == list(model.vision.data_config["mean"])


def test_export_safetensors_rebuilds_every_part(trained_clip, tmp_path):
    out = tmp_path / "st"
    assert main(["export", str(trained_clip), "--format", "safetensors", "-o", str(out)]) == 0
    manifest = json.loads((out / "vlforge.json").read_text())
    assert manifest["parts"].keys() >= {"vision", "text", "objectives"}
    model, images, tokens, image, text = vlforge_reference(trained_clip)
    again = build(out / "recipe.toml")
    load_init_weights(again, str(out))
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_unrepresentable_models_are_refused(tiny_recipe, runs_root, tmp_path, capsys):
    """The quickstart's towers (BERT text, no pre-norm ViT with a patch bias) are not a CLIP checkpoint."""
    assert main(["run", str(tiny_recipe), "train.steps=1", "~evaluators", "train.checkpoint_every=0"]) == 0
    (run_dir,) = runs_root.glob("tests/*")
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "hf-clip", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "model.text must be hf.text with config.model_type = 'clip_text_model' (this one: bert)" in err
    assert "model.vision needs a pre-norm" in err and "model.vision needs no patch-embedding bias" in err
    assert "--format safetensors" in err
    assert (
        main(["export", str(tmp_path / "nowhere"), "--format", "open_clip", "-o", str(tmp_path / "y")]) == 2
    )
    assert "not a run directory" in capsys.readouterr().err


def test_export_choices_are_the_exporters():
    # The CLI lists the formats without importing torch; they must be the ones export() knows.
    from vlforge.weights.commands import FORMATS
    from vlforge.weights.export import EXPORTERS

    assert tuple(EXPORTERS) == FORMATS
