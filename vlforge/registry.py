"""Named components: a kind, a name, a pydantic config model and a factory.

Plugins fill the registry from their ``vlforge_register_components`` hook; a
recipe names a component by ``type = "<name>"`` and the rest of its table is
validated against the registered config model.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict

from vlforge.errors import VlforgeError

KINDS = (
    "vision_encoder",
    "text_encoder",
    "adapter",
    "fusion",
    "objective",
    "masking",
    "teacher",
    "dataset",
    "evaluator",
    "launcher",
    "sink",
)


class ComponentConfig(BaseModel):
    """Base for every component config: unknown keys are errors, numbers must be finite."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ConfigIssue(NamedTuple):
    """A problem a config's resource check found: the option (relative to the table) and what is wrong."""

    key: str  # the option's name in the component table, e.g. "tokenizer"; "" for the whole table
    message: str


class ResourceChecked(Protocol):
    """A component config that checks what it points at: files, model names, shapes.

    Field validators check values; ``check_resources`` checks the world they refer
    to, which may be slow (reading a file's header, importing timm). The recipe
    loader calls it on every validated config that defines it, under ``vlforge
    validate`` and before ``vlforge run`` starts, and reports each issue with the
    dotted key and the file that set it, beside every other problem of the recipe.
    Return no issue when all is well; never raise for a user error.
    """

    def check_resources(self) -> Iterable[ConfigIssue]: ...


class RegistryError(VlforgeError):
    """A component was registered twice or looked up under an unknown name."""


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    config: type[BaseModel]
    factory: Callable[..., Any]
    source: str  # plugin that registered it, e.g. "vlforge_plugins.clip (vlforge 0.1.0)"
    summary: str = ""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Registry:
    """kind -> name -> Component. Duplicate names are refused, naming both sources."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self.current_source = "<unknown>"

    def add(
        self,
        kind: str,
        name: str,
        *,
        config: type[BaseModel],
        factory: Callable[..., Any],
        summary: str = "",
    ) -> None:
        if kind not in self._components:
            raise RegistryError(
                f"{self.current_source}: unknown component kind '{kind}'{did_you_mean(kind, KINDS)} "
                f"(kinds: {', '.join(KINDS)})"
            )
        existing = self._components[kind].get(name)
        if existing is not None:
            raise RegistryError(
                f"{kind} '{name}' is registered twice: by {existing.source} and by {self.current_source}"
            )
        doc = summary or (factory.__doc__ or "").strip().split("\n")[0]
        self._components[kind][name] = Component(kind, name, config, factory, self.current_source, doc)

    def get(self, kind: str, name: str) -> Component:
        try:
            return self._components[kind][name]
        except KeyError:
            raise RegistryError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        names = self.names(kind)
        valid = ", ".join(f"'{n}'" for n in names) or "none registered"
        return f"unknown {kind} '{name}'{did_you_mean(name, names)} (valid: {valid})"

    def names(self, kind: str) -> list[str]:
        return sorted(self._components.get(kind, {}))

    def __iter__(self) -> Iterator[Component]:
        for kind in KINDS:
            yield from (self._components[kind][n] for n in sorted(self._components[kind]))
