"""Recipes: extends, overrides, and errors that name the key, the file and the choices."""

from __future__ import annotations

import pytest

from vlforge.recipe import (
    COMMAND_LINE,
    RecipeError,
    deep_merge,
    flatten,
    load_recipe,
    parse_override,
    read_toml,
)


def problems_of(path, overrides=()) -> list:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.problems


def test_tiny_recipe_validates_and_fills_component_defaults(tiny_recipe):
    recipe, plugins = load_recipe(tiny_recipe)
    resolved = recipe.resolved()
    assert recipe.name == "tiny"
    assert resolved["objectives"]["contrastive"]["type"] == "clip.infonce"
    assert resolved["objectives"]["contrastive"]["weight"] == 1.0
    # defaults of the component's own config model appear in the resolved recipe
    assert resolved["data"]["seed"] == 0
    assert "embed_dim" in resolved["model"]["vision"]
    assert "clip.infonce" in plugins.registry.names("objective")


def test_resolved_toml_round_trips(tiny_recipe, write):
    recipe, _ = load_recipe(tiny_recipe)
    again, _ = load_recipe(write("again.toml", recipe.to_toml()))
    assert again.resolved() == recipe.resolved()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optim.lr=3e-4", ("optim.lr", 3e-4)),
        ("train.steps=10", ("train.steps", 10)),
        ('name="x y"', ("name", "x y")),
        ("name=bare", ("name", "bare")),
        ("optim.betas=[0.9, 0.95]", ("optim.betas", [0.9, 0.95])),
        ("train.progress=false", ("train.progress", False)),
    ],
)
def test_overrides_are_toml_typed(text, expected):
    assert parse_override(text) == expected


def test_overrides_apply_and_are_validated(tiny_recipe):
    recipe, _ = load_recipe(tiny_recipe, ["optim.lr=3e-4", "train.steps=7", "data.train_size=100"])
    assert recipe.optim.lr == 3e-4
    assert recipe.train.steps == 7
    assert recipe.data.config.train_size == 100
    problems = problems_of(tiny_recipe, ["train.stepz=3"])
    assert problems[0].key == "train.stepz"
    assert problems[0].source == COMMAND_LINE
    assert "did you mean 'steps'" in problems[0].message


def test_unknown_key_names_file_choices_and_suggestion(tiny_recipe):
    text = tiny_recipe.read_text().replace("lr = 1e-3", "lr = 1e-3\nweight_dcay = 0.1")
    tiny_recipe.write_text(text)
    (problem,) = problems_of(tiny_recipe)
    assert problem.key == "optim.weight_dcay"
    assert problem.source == str(tiny_recipe)
    assert "did you mean 'weight_decay'" in problem.message
    assert "valid keys:" in problem.message and "betas" in problem.message


def test_unknown_component_lists_valid_names(tiny_recipe):
    tiny_recipe.write_text(tiny_recipe.read_text().replace('type = "clip.infonce"', 'type = "clip.infonse"'))
    (problem,) = problems_of(tiny_recipe)
    assert problem.key == "objectives.contrastive.type"
    assert "did you mean 'clip.infonce'" in problem.message
    assert "valid:" in problem.message


def test_component_option_checked_against_its_config_model(tiny_recipe):
    tiny_recipe.write_text(tiny_recipe.read_text().replace("train_size = 512", "trian_size = 512"))
    (problem,) = problems_of(tiny_recipe)
    assert problem.key == "data.trian_size"
    assert "did you mean 'train_size'" in problem.message


def test_all_problems_reported_at_once(tiny_recipe):
    text = (
        tiny_recipe.read_text()
        .replace("steps = 6", 'steps = "six"')
        .replace('type = "retrieval"', 'type = "retreival"')
        .replace("train_size = 512", "train_size = -1")
    )
    tiny_recipe.write_text(text)
    # Static sections and component tables in one report: nothing appears only after a fix.
    problems = problems_of(tiny_recipe)
    assert sorted(p.key for p in problems) == ["data.train_size", "evaluators.retrieval.type", "train.steps"]
    assert {p.source for p in problems} == {str(tiny_recipe)}


def test_extends_deep_merges_and_errors_name_the_base_file(write, tiny_recipe):
    child = write("child.toml", f'extends = "{tiny_recipe.name}"\n[optim]\nlr = 5e-4\n[train]\nsteps = 2\n')
    recipe, _ = load_recipe(child)
    assert recipe.optim.lr == 5e-4 and recipe.train.steps == 2
    assert recipe.train.batch_size == 16  # inherited from the base
    assert recipe.name == "tiny"  # the base names it

    tiny_recipe.write_text(tiny_recipe.read_text().replace("log_every = 1", "log_evry = 1"))
    (problem,) = problems_of(child)
    assert problem.key == "train.log_evry" and problem.source == str(tiny_recipe)


def test_extends_cycle_and_missing_files(write):
    write("a.toml", 'extends = "b.toml"\n')
    write("b.toml", 'extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="circular extends"):
        read_toml(write("c.toml", 'extends = "a.toml"\n'))
    with pytest.raises(RecipeError, match="file not found"):
        read_toml(write("x.toml", "").parent / "missing.toml")
    with pytest.raises(RecipeError, match="base recipe .* not found"):
        read_toml(write("d.toml", 'extends = "nope.toml"\n'))


def test_invalid_toml_is_a_recipe_error(write):
    with pytest.raises(RecipeError, match="invalid TOML"):
        read_toml(write("bad.toml", "[train\nsteps = 1"))


def test_batch_must_divide_over_ranks_and_accumulation(tiny_recipe):
    (problem,) = problems_of(tiny_recipe, ["train.accum_steps=3"])
    assert problem.key == "train.batch_size" and "not divisible" in problem.message


def test_deep_merge_and_flatten():
    merged = deep_merge({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"c": [2], "e": 3}})
    assert merged == {"a": {"b": 1, "c": [2], "e": 3}, "d": 1}
    assert flatten(merged) == {"a.b": 1, "a.c": [2], "a.e": 3, "d": 1}
