"""The plugin in docs/writing-plugins.md works exactly as printed."""

from __future__ import annotations

import re

import pytest

from vlforge.plugins import load_plugins
from vlforge.recipe import RecipeError, load_recipe

from .conftest import REPO


def doc_plugin_source() -> str:
    text = (REPO / "docs" / "writing-plugins.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.fixture
def siglip_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "siglip_plugin.py").write_text(doc_plugin_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    return "siglip_plugin"


def test_doc_plugin_registers_and_validates(siglip_module, tiny_recipe):
    plugins = load_plugins([siglip_module])
    assert (
        plugins.registry.get("objective", "siglip.sigmoid").config.model_fields["init_bias"].default == -10.0
    )
    overrides = [f'plugins=["{siglip_module}"]', 'objectives.contrastive.type="siglip.sigmoid"']
    with pytest.raises(RecipeError, match="did you mean 'init_bias'"):
        load_recipe(tiny_recipe, [*overrides, "objectives.contrastive.init_bais=-5.0"])
    recipe, _ = load_recipe(tiny_recipe, [*overrides, "objectives.contrastive.init_bias=-5.0"])
    assert recipe.objectives["contrastive"].config.init_bias == -5.0


@pytest.mark.slow
def test_doc_plugin_trains_and_logs_its_metric(siglip_module, tiny_recipe, runs_root):
    from vlforge.cli import main
    from vlforge.results.queries import query

    overrides = [
        f'plugins=["{siglip_module}"]',
        'objectives.contrastive.type="siglip.sigmoid"',
        "train.steps=3",
    ]
    assert main(["run", str(tiny_recipe), *overrides]) == 0
    counts = query(
        str(runs_root),
        "SELECT name, count(*) AS n FROM metrics WHERE name IN ('siglip/bias', 'train/contrastive.sigmoid') "
        "GROUP BY name ORDER BY name",
        "csv",
    )
    assert counts.strip().splitlines()[1:] == ["siglip/bias,3", "train/contrastive.sigmoid,3"]
