"""Plugin discovery, duplicate names, failing plugins and hook errors that name their plugin."""

from __future__ import annotations

import textwrap

import pytest

from vlforge.hookspecs import hookimpl
from vlforge.plugins import DISABLE_AUTOLOAD_ENV, PluginError, load_plugins
from vlforge.recipe import RecipeError, load_recipe
from vlforge.registry import ComponentConfig, RegistryError


def make_module(tmp_path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


DUPLICATE_CLIP = """
from vlforge.hookspecs import hookimpl
from vlforge.registry import ComponentConfig

@hookimpl
def vlforge_register_components(registry):
    registry.add("objective", "clip.infonce", config=ComponentConfig, factory=lambda c, ctx: None)
"""


def test_builtin_method_plugins_come_from_entry_points():
    plugins = load_plugins()
    clip = plugins.registry.get("objective", "clip.infonce")
    assert "entry point 'clip'" in clip.source
    assert "vlforge.builtin" in plugins.registry.get("dataset", "synthetic.shapes").source


def test_autoload_can_be_disabled(monkeypatch, tiny_recipe):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert "clip.infonce" not in load_plugins().registry.names("objective")
    with pytest.raises(RecipeError, match="unknown objective 'clip.infonce'"):
        load_recipe(tiny_recipe)
    # a recipe can still name the module explicitly
    recipe, plugins = load_recipe(tiny_recipe, ['plugins=["vlforge_plugins.clip"]'])
    assert "clip.infonce" in plugins.registry.names("objective")


def test_duplicate_names_name_both_sources(tmp_path, monkeypatch):
    name = make_module(tmp_path, monkeypatch, "dup_clip", DUPLICATE_CLIP)
    with pytest.raises(RegistryError) as info:
        load_plugins([name])
    message = str(info.value)
    assert "registered twice" in message
    assert "vlforge_plugins.clip" in message and "dup_clip" in message


def test_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch, tiny_recipe):
    name = make_module(tmp_path, monkeypatch, "broken_plugin", "import not_a_module_anywhere\n")
    with pytest.raises(
        PluginError, match="plugin module 'broken_plugin' .* failed to import: ModuleNotFoundError"
    ):
        load_plugins([name])
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, [f'plugins=["{name}"]'])
    assert info.value.problems[0].key == "plugins"


def test_hook_typo_is_refused(tmp_path, monkeypatch):
    name = make_module(
        tmp_path,
        monkeypatch,
        "typo_plugin",
        """
        from vlforge.hookspecs import hookimpl

        @hookimpl
        def vlforge_after_optimiser_step(state):
            pass
        """,
    )
    with pytest.raises(Exception, match="vlforge_after_optimiser_step"):
        load_plugins([name])


class Exploding:
    @hookimpl
    def vlforge_after_optimizer_step(self, state):
        raise ValueError("boom")


class Quiet:
    @hookimpl
    def vlforge_after_optimizer_step(self, state):
        return "ok"


def test_exception_in_a_hook_names_the_plugin():
    plugins = load_plugins()
    plugins.register_component(Quiet(), "component:quiet")
    assert plugins.call("vlforge_after_optimizer_step", state=None) == ["ok"]
    plugins.register_component(Exploding(), "component:exploding")
    with pytest.raises(
        PluginError,
        match="plugin 'component component:exploding' raised in "
        "vlforge_after_optimizer_step: ValueError: boom",
    ):
        plugins.call("vlforge_after_optimizer_step", state=None)


def test_components_without_hooks_are_not_registered():
    plugins = load_plugins()
    plugins.register_component(object(), "component:plain")
    assert not plugins.manager.has_plugin("component:plain")


def test_unknown_kind_is_refused(tmp_path, monkeypatch):
    name = make_module(
        tmp_path,
        monkeypatch,
        "bad_kind",
        """
        from vlforge.hookspecs import hookimpl
        from vlforge.registry import ComponentConfig

        @hookimpl
        def vlforge_register_components(registry):
            registry.add("objectiv", "x", config=ComponentConfig, factory=lambda c, ctx: None)
        """,
    )
    with pytest.raises(RegistryError, match="unknown component kind 'objectiv'; did you mean 'objective'"):
        load_plugins([name])


def test_component_config_forbids_extra_keys():
    class Config(ComponentConfig):
        ratio: float = 0.5

    with pytest.raises(Exception, match="Extra inputs are not permitted"):
        Config.model_validate({"ratoi": 0.5})
