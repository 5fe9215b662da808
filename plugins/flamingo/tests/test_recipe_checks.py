"""`vlforge validate` checks the Flamingo LM's folder and tokenizer before a run starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from vlforge_plugins.flamingo import GatedXAttnConfig

from vlforge.recipe import RecipeError, load_recipe
from vlforge.registry import ConfigIssue

TINY = Path(__file__).resolve().parents[3] / "recipes" / "flamingo_tiny.toml"


def problems(*overrides: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, list(overrides), check_resources=True)
    return {problem.key: problem.message for problem in info.value.problems}


def test_flamingo_tokenizer_and_lm_folder_are_checked(tmp_path):
    load_recipe(TINY, check_resources=True)  # flamingo:shapes is built in
    found = problems('model.fusion.tokenizer="flamingo:shapez"')
    assert (
        "unknown Flamingo tokenizer 'flamingo:shapez'; did you mean 'flamingo:shapes'?"
        in found["model.fusion.tokenizer"]
    )
    found = problems(f'model.fusion.tokenizer="{tmp_path / "tok"}"')
    assert f"tokenizer folder '{tmp_path / 'tok'}' not found" in found["model.fusion.tokenizer"]
    # A recipe cannot drop the tiny recipe's lm_config by override: check the config itself.
    config = GatedXAttnConfig(lm=str(tmp_path / "lm"))
    assert list(config.check_resources()) == [ConfigIssue("lm", f"LM folder '{tmp_path / 'lm'}' not found")]
    (tmp_path / "lm").mkdir()
    assert list(config.check_resources()) == []  # the folder holds the tokenizer too
