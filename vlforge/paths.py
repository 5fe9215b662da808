"""Recipe paths: a config field typed ``RecipePath`` resolves against the file that set it.

``tokenizer = "tok/bert"`` in ``/exp/recipes/a.toml`` means ``/exp/recipes/tok/bert``,
whatever the working directory, as ``extends`` already did. A value set on the
command line resolves against the working directory. Left as written: absolute
paths, URLs (``s3://...``), built-in names (``vlforge:shapes``, any ``scheme:name``)
and empty strings. The resolved recipe (saved in the run directory) holds absolute
paths, so a resumed run finds the same files.

A component declares its path fields by type, not by a list of key names::

    from vlforge.paths import RecipePath
    class MyConfig(ComponentConfig):
        weights: RecipePath | None = None
        shards: RecipePath | list[RecipePath] = ...
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import BaseModel


class RelativeToRecipe:
    """Marker in ``Annotated[str, RelativeToRecipe()]``: the string is a path relative to its recipe."""

    def __repr__(self) -> str:
        return "RelativeToRecipe()"


RecipePath = Annotated[str, RelativeToRecipe()]

# "vlforge:shapes", "flamingo:shapes", "s3://bucket/x": names and URLs, never joined to a folder.
_NAMED = re.compile(r"^[A-Za-z][\w.+-]*:")


def is_recipe_path(annotation: Any) -> bool:
    """Whether an annotation (``RecipePath``, ``RecipePath | None``, ``dict[str, list[RecipePath]]``...)
    holds a recipe path anywhere inside."""
    metadata = getattr(annotation, "__metadata__", ())
    if any(isinstance(m, RelativeToRecipe) for m in metadata):
        return True
    return any(is_recipe_path(arg) for arg in get_args(annotation))


def resolve_path(value: str, base: str | None) -> str:
    """``value`` joined to the folder ``base`` (None: the working directory), unless absolute or a name."""
    if not value or _NAMED.match(value) or Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser()) if value.startswith("~") else value
    if base is not None and "://" in base:
        return f"{base.rstrip('/')}/{value}"
    return str((Path(base) if base is not None else Path.cwd()).resolve() / value)


def _resolve_value(value: Any, base: str | None) -> Any:
    if isinstance(value, str):
        return resolve_path(value, base)
    if isinstance(value, list):
        return [_resolve_value(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_value(v, base) for k, v in value.items()}
    return value


def resolve_model_paths(model: BaseModel, prefix: str, folder_of: Any) -> None:
    """Resolve, in place, every ``RecipePath`` field of ``model`` and of the models nested in it.

    ``folder_of(dotted_key)`` gives the folder the key's value is relative to (None: the
    working directory).
    """
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if value is None:
            continue
        if any(isinstance(m, RelativeToRecipe) for m in info.metadata) or is_recipe_path(info.annotation):
            setattr(model, name, _resolve_value(value, folder_of(key)))
        elif isinstance(value, BaseModel):
            resolve_model_paths(value, f"{key}.", folder_of)
        elif isinstance(value, dict):
            for child_name, child in value.items():
                if isinstance(child, BaseModel):
                    resolve_model_paths(child, f"{key}.{child_name}.", folder_of)
