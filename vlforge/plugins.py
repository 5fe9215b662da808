"""The plugin manager: core components, entry-point plugins, recipe-named modules.

Loading order:

1. ``vlforge.builtin``: the generic components (timm and transformers
   encoders, the generated dataset, retrieval and zero-shot evaluators). It is
   part of the engine, so it is always there, as pytest's own plugins are.
2. Every entry point in the group ``vlforge.plugins`` (the method plugins
   shipped with vlforge are registered there exactly as a third-party package
   would be), unless ``VLFORGE_DISABLE_PLUGIN_AUTOLOAD=1``.
3. Modules a recipe names in ``plugins = [...]`` (or ``--plugin`` on the CLI).

Plugin modules must import heavy libraries (torch, timm, transformers) lazily,
inside their factories, so that ``vlforge --help``/``validate`` stay fast.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import traceback
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from vlforge import hookspecs
from vlforge.errors import VlforgeError
from vlforge.registry import Registry, RegistryError

ENTRY_POINT_GROUP = "vlforge.plugins"
DISABLE_AUTOLOAD_ENV = "VLFORGE_DISABLE_PLUGIN_AUTOLOAD"
CORE_PLUGIN = "vlforge.builtin"


class PluginError(VlforgeError):
    """A plugin failed to import, to register, or raised inside a hook."""


class Plugins:
    """A pluggy manager plus the component registry it fills."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.sources: dict[str, str] = {}  # plugin name -> where it came from

    # ------------------------------------------------------------------ loading

    def load_module(self, module_name: str, origin: str) -> None:
        """Import ``module_name`` and register it; ``origin`` says who asked (for errors)."""
        if self.manager.has_plugin(module_name):
            return
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import failure is the plugin's, reported as such
            raise PluginError(
                f"plugin module '{module_name}' ({origin}) failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        if not self.manager.is_registered(module):  # e.g. already loaded from its entry point
            self.register(module, module_name, source=f"{module_name} ({origin})")

    def load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if self.manager.has_plugin(ep.name) or self.manager.is_blocked(ep.name):
                continue
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
            origin = f"entry point '{ep.name}' of {dist}"
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin '{ep.value}' ({origin}) failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            self.register(plugin, ep.name, source=f"{ep.value} ({origin})")

    def register(self, plugin: ModuleType | object, name: str, source: str) -> None:
        """Register a plugin object and let it add its components."""
        self.manager.register(plugin, name=name)
        self.sources[name] = source
        self.registry.current_source = source
        try:
            for impl in self.manager.hook.vlforge_register_components.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(registry=self.registry)
        except RegistryError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {source} failed to register its components: {exc}") from exc
        finally:
            self.registry.current_source = "<unknown>"
        self.manager.check_pending()

    def register_component(self, component: object, name: str) -> None:
        """Let a built component (e.g. a teacher) receive loop events, if it implements any."""
        if _has_hookimpls(component) and not self.manager.has_plugin(name):
            self.manager.register(component, name=name)
            self.sources[name] = f"component {name}"

    # ------------------------------------------------------------------ calling

    def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Fire a loop event; an exception names the plugin whose hook raised it."""
        hook = getattr(self.manager.hook, hook_name)
        try:
            return hook(**kwargs)
        except Exception as exc:
            culprit = self._culprit(hook, exc)
            if culprit is None:
                raise
            raise PluginError(
                f"plugin '{culprit}' raised in {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc

    def _culprit(self, hook: pluggy.HookCaller, exc: BaseException) -> str | None:
        """The plugin whose hook implementation appears in the exception's traceback."""
        codes = {impl.function.__code__: impl.plugin_name for impl in hook.get_hookimpls()}
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            if frame.f_code in codes:
                return self.sources.get(codes[frame.f_code], codes[frame.f_code])
        return None


def _has_hookimpls(obj: object) -> bool:
    return _type_has_hookimpls(type(obj))


@functools.cache
def _type_has_hookimpls(cls: type) -> bool:
    """Cached per class: the engine asks this of every module of a large model."""
    marker = f"{hookspecs.PROJECT}_impl"
    return any(hasattr(getattr(cls, attr, None), marker) for attr in dir(cls))


def autoload_enabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in {"1", "true", "yes"}


def load_plugins(modules: list[str] | tuple[str, ...] = (), origin: str = "named in the recipe") -> Plugins:
    """Build the plugin manager: core, entry points (unless disabled), then ``modules``."""
    plugins = Plugins()
    plugins.load_module(CORE_PLUGIN, "vlforge core")
    if autoload_enabled():
        plugins.load_entry_points()
    # Recipe-named plugins may live next to the recipe or in the working directory.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        plugins.load_module(module, origin)
    return plugins
