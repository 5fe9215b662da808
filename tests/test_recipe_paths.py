"""Recipe-relative paths, shipped resources by name, and deleting / replacing inherited keys."""

from __future__ import annotations

import shutil

import pytest

from vlforge.cli import main
from vlforge.recipe import RecipeError, load_recipe
from vlforge.resources import shipped_recipes, shipped_tokenizer

CAPTIONS_DATA = """
[data]
__replace__ = true
type = "captions"
files = ["captions/train.jsonl"]
splits = { val = ["captions/val.jsonl"] }
"""


def problems_of(path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


def test_relative_tokenizer_resolves_against_the_recipe_folder(tmp_path, tiny_recipe, monkeypatch):
    folder = tmp_path / "elsewhere" / "recipes"
    shutil.copytree(shipped_tokenizer("bert-base-uncased"), folder / "tok")
    text = tiny_recipe.read_text().replace('tokenizer = "vlforge:shapes"', 'tokenizer = "tok"')
    (folder / "bert.toml").write_text(text)
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    recipe, _ = load_recipe(folder / "bert.toml")
    assert recipe.model.text.config.tokenizer == str(folder / "tok")
    assert main(["validate", str(folder / "bert.toml")]) == 0
    # a value given on the command line is relative to the working directory
    recipe, _ = load_recipe(folder / "bert.toml", ["model.text.tokenizer=elsewhere/recipes/tok"])
    assert recipe.model.text.config.tokenizer == str(folder / "tok")


def test_inherited_paths_stay_relative_to_the_file_that_set_them(write, tiny_recipe, tmp_path):
    write("base/data.toml", f'extends = "../tiny.toml"\n{CAPTIONS_DATA}')
    child = write("child/run.toml", 'extends = "../base/data.toml"\nmodel.init_from = "ckpt/step.pt"\n')
    recipe, _ = load_recipe(child)
    data = recipe.data.config
    assert data.files == [str(tmp_path / "base/captions/train.jsonl")]
    assert data.splits == {"val": [str(tmp_path / "base/captions/val.jsonl")]}
    assert recipe.model.init_from == str(tmp_path / "child/ckpt/step.pt")
    assert recipe.model.text.config.tokenizer == "vlforge:shapes"  # a built-in name stays a name
    # the resolved recipe (what a run directory keeps) holds absolute paths
    assert str(tmp_path / "base/captions/train.jsonl") in recipe.to_toml()


def test_replace_marker_replaces_an_inherited_table(write, tiny_recipe):
    merged_child = write(
        "merged.toml", 'extends = "tiny.toml"\n[data]\ntype = "captions"\nfiles = "x.jsonl"\n'
    )
    problems = problems_of(merged_child)
    # without the marker the table merges: the shapes dataset's keys are unknown to `captions`
    assert any(p.startswith("data.train_size: unknown key") for p in problems)
    recipe, _ = load_recipe(write("replaced.toml", f'extends = "tiny.toml"\n{CAPTIONS_DATA}'))
    assert recipe.data.type == "captions"
    assert recipe.data.options.keys() == {"files", "splits"}


def test_delete_list_drops_inherited_keys(write, tiny_recipe):
    child = write("child.toml", 'extends = "tiny.toml"\ndelete = ["evaluators.retrieval", "data.val_size"]\n')
    recipe, _ = load_recipe(child)
    assert recipe.evaluators == {}
    assert recipe.data.config.val_size != 64  # back to the dataset's default


def test_deleting_is_validated(write, tiny_recipe):
    problems = problems_of(write("c1.toml", 'extends = "tiny.toml"\ndelete = ["data.nope"]\n'))
    assert problems[0].startswith("delete: 'data.nope' is not set by the base recipe")
    problems = problems_of(write("c2.toml", 'extends = "tiny.toml"\ndelete = 3\n'))
    assert problems[0].startswith("delete: must be a list of dotted inherited keys")
    problems = problems_of(write("c3.toml", 'delete = ["data"]\n'))
    assert "extends nothing" in problems[0]
    problems = problems_of(write("c4.toml", 'extends = "tiny.toml"\n[data]\n__replace__ = 1\n'))
    assert problems[0].startswith("data.__replace__: must be true")
    # deleting a required key: validation names it
    problems = problems_of(write("c5.toml", 'extends = "tiny.toml"\ndelete = ["train.steps"]\n'))
    assert problems[0].startswith("train.steps: required key is missing")


def test_command_line_deletes_and_replaces(tiny_recipe, capsys):
    recipe, _ = load_recipe(tiny_recipe, ["~evaluators.retrieval", "~data.val_size"])
    assert recipe.evaluators == {}
    recipe, _ = load_recipe(tiny_recipe, ["~evaluators.retrieval", 'data={type="captions", files="a.jsonl"}'])
    assert recipe.data.options.keys() == {"files"}
    assert problems_of(tiny_recipe, ["~data.nope"]) == [
        "data.nope: cannot delete: no recipe sets this key [command line]"
    ]
    assert main(["validate", str(tiny_recipe), "~evaluators.retrieval"]) == 0
    assert main(["validate", str(tiny_recipe), "~train.steps"]) == 2
    assert "train.steps: required key is missing" in capsys.readouterr().err


def test_shipped_recipes_run_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert {"quickstart", "flip_vith_laion2b", "albef_4m"} <= shipped_recipes().keys()
    assert main(["validate", "albef_4m"]) == 0  # its tokenizer is the shipped vlforge:bert-base-uncased
    assert main(["validate", "quickstrat"]) == 2
    assert "no shipped recipe of that name; did you mean 'quickstart'?" in capsys.readouterr().err
