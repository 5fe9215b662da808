"""What `vlforge validate` catches before a run starts: every problem in one report, exit 2, no traceback.

Resource checks (``check_resources`` of a component config), non-finite numbers,
non-UTF-8 files, and overrides that ``--resume`` cannot honour.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vlforge.cli import main, refuse_resume_overrides
from vlforge.data.tokenizers import VOCABULARY_NAMES, _builtin_vocabularies
from vlforge.encoders import TimmViTConfig
from vlforge.encoders.vision import build_timm_vit
from vlforge.errors import UserError
from vlforge.recipe import RecipeError, load_recipe


def validate(recipe, capsys, *overrides: str) -> tuple[int, str]:
    code = main(["validate", str(recipe), *overrides])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


def edit(recipe, old: str, new: str) -> None:
    text = recipe.read_text()
    assert old in text
    recipe.write_text(text.replace(old, new))


def test_missing_tokenizer_folder_is_a_validate_error_naming_key_and_file(tiny_recipe, tmp_path, capsys):
    missing = tmp_path / "no_such_tokenizer"
    edit(tiny_recipe, 'tokenizer = "vlforge:shapes"', f'tokenizer = "{missing}"')
    code, err = validate(tiny_recipe, capsys)
    assert code == 2
    assert f"model.text.tokenizer: tokenizer folder '{missing}' not found" in err
    assert f"[{tiny_recipe}]" in err


def test_unknown_builtin_tokenizer_suggests_the_close_name(tiny_recipe, capsys):
    code, err = validate(tiny_recipe, capsys, 'model.text.tokenizer="vlforge:shapez"')
    assert code == 2
    assert "model.text.tokenizer: unknown built-in tokenizer 'vlforge:shapez'" in err
    assert "did you mean 'vlforge:shapes'?" in err and "[command line]" in err
    assert set(VOCABULARY_NAMES) == set(_builtin_vocabularies())  # the light list matches the real one


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("lr = 1e-3", "lr = nan", "optim.lr"),
        ("lr = 1e-3", "lr = 1e-3\nweight_decay = inf", "optim.weight_decay"),
        ('type = "clip.infonce"', 'type = "clip.infonce"\nweight = -inf', "objectives.contrastive.weight"),
        ("train_size = 512", "train_size = 512\nbackground_noise = inf", "data.background_noise"),
    ],
)
def test_non_finite_numbers_are_refused(tiny_recipe, capsys, old, new, key):
    edit(tiny_recipe, old, new)
    code, err = validate(tiny_recipe, capsys)
    assert code == 2
    assert f"{key}: Input should be a finite number" in err and f"[{tiny_recipe}]" in err


def test_unknown_timm_model_suggests_the_close_name(tiny_recipe, capsys):
    code, err = validate(tiny_recipe, capsys, 'model.vision.model="vit_tiny_patch16_22"')
    assert code == 2
    assert "model.vision.model: unknown timm model 'vit_tiny_patch16_22'" in err
    assert "did you mean 'vit_tiny_patch16_224'?" in err


def _vit_weights(path, img_size: int = 32, width: int = 32) -> None:
    """A timm ViT's weights (2 blocks, 8-pixel patches) as safetensors or a torch file, by suffix."""
    config = TimmViTConfig(
        model="vit_tiny_patch16_224", img_size=img_size, patch_size=8, width=width, depth=2, heads=2
    )
    state = build_timm_vit(config).vit.state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


def test_pretrained_file_whose_shapes_do_not_fit_is_a_validate_error(tiny_recipe, tmp_path, capsys):
    wide, fitting = tmp_path / "wide.safetensors", tmp_path / "fits.pth"
    _vit_weights(wide, width=64)
    _vit_weights(tmp_path / "fits.safetensors")
    _vit_weights(fitting, img_size=64)

    code, err = validate(tiny_recipe, capsys, f'model.vision.pretrained="{wide}"')
    assert code == 2
    assert f"model.vision.pretrained: {wide} does not fit" in err
    assert "other shapes [" in err and "blocks.0.attn.qkv.bias (192,) in the file, (96,) in the model" in err

    # Same trunk on another grid (.pth, position embeddings resampled) and an exact fit: both validate.
    for good in (fitting, tmp_path / "fits.safetensors"):
        code, err = validate(tiny_recipe, capsys, f'model.vision.pretrained="{good}"')
        assert code == 0, err

    code, err = validate(tiny_recipe, capsys, f'model.vision.pretrained="{tmp_path / "gone.pth"}"')
    assert code == 2 and f"model.vision.pretrained: weights file '{tmp_path / 'gone.pth'}' not found" in err
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    code, err = validate(tiny_recipe, capsys, f'model.vision.pretrained="{tmp_path / "junk.pth"}"')
    assert code == 2 and "model.vision.pretrained: cannot read" in err


def test_resource_checks_join_the_other_problems_in_one_report(tiny_recipe):
    edit(tiny_recipe, "steps = 6", 'steps = "six"')
    edit(tiny_recipe, 'tokenizer = "vlforge:shapes"', 'tokenizer = "vlforge:shapez"')
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, ['model.vision.model="vit_nope"', "data.trian_size=3"], check_resources=True)
    keys = sorted(problem.key for problem in info.value.problems)
    assert keys == ["data.trian_size", "model.text.tokenizer", "model.vision.model", "train.steps"]
    # Without check_resources (`vlforge show`, the run's workers) only the recipe itself is checked.
    load_recipe(tiny_recipe, ['model.vision.model="vit_nope"', "train.steps=6", "model.text.tokenizer=x"])


def test_non_utf8_recipe_names_file_and_byte_position(tiny_recipe, write, capsys):
    tiny_recipe.write_bytes(b'# caf\xe9\nname = "tiny"\n' + tiny_recipe.read_bytes())
    code, err = validate(tiny_recipe, capsys)
    assert code == 2
    assert f"recipe {tiny_recipe}: 1 problem" in err
    assert "not UTF-8 text: byte 0xe9 at position 5 (line 1, column 6)" in err and f"[{tiny_recipe}]" in err
    child = write("child.toml", f'extends = "{tiny_recipe.name}"\n')
    code, err = validate(child, capsys)
    assert code == 2 and f"[{tiny_recipe}]" in err  # the base file is the one named


def test_resume_refuses_overrides_it_cannot_honour(tiny_recipe, runs_root, capsys):
    # A run of the recipe as `vlforge run` leaves it: its resolved recipe and an unfinished status.
    run_dir = runs_root / "tests" / "r1"
    run_dir.mkdir(parents=True)
    recipe, _ = load_recipe(tiny_recipe)
    (run_dir / "recipe.toml").write_text(recipe.to_toml())
    status = '{"recipe_name": "tiny", "status": "interrupted", "start_time": "2026-01-01T00:00:00"}'
    (run_dir / "status.json").write_text(status)
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}

    code = main(["run", str(tiny_recipe), "optim.lr=1e30", "data.train_size=99", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"--resume continues run file://{run_dir} with the recipe it started with" in err
    assert "optim.lr=1e30 (the run has optim.lr = 0.001)" in err
    assert "data.train_size=99 (the run has data.train_size = 512)" in err
    assert "Only launch.* may change on resume" in err
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before  # nothing touched

    # launch.* and overrides that repeat the run's own values pass.
    refuse_resume_overrides(str(run_dir), ["launch.nproc=2", "optim.lr=1e-3", "train.steps=6"])
    with pytest.raises(UserError, match=r"model.vision.depth=3 \(the run has model.vision.depth = 2\)"):
        refuse_resume_overrides(str(run_dir), ["model.vision.depth=3"])
    with pytest.raises(UserError, match=r"~data.train_size \(the run has data.train_size\)"):
        refuse_resume_overrides(str(run_dir), ["~launch.profile", "~data.train_size"])


def test_a_table_wide_error_names_the_table(tiny_recipe):
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, ['model.text.pretrained="/models/bert"'])
    (problem,) = info.value.problems
    assert problem.key == "model.text" and "give exactly one of 'pretrained'" in problem.message
