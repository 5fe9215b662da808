"""Files vlforge ships: recipes, cluster profiles and tokenizers, in a checkout or an installed wheel.

In a checkout they live in the repository (``recipes/``, ``slurm/profiles/``,
``vlforge/tokenizers/``); the wheel maps the first two into the package as
``vlforge/recipes`` and ``vlforge/profiles`` (``pyproject.toml``:
``package-dir``), so the same lookup works in both without copying files.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE.parent

# kind -> (folder inside an installed package, folder in a checkout)
_FOLDERS = {
    "recipes": (PACKAGE / "recipes", _CHECKOUT / "recipes"),
    "profiles": (PACKAGE / "profiles", _CHECKOUT / "slurm" / "profiles"),
    "tokenizers": (PACKAGE / "tokenizers", PACKAGE / "tokenizers"),
}


def shipped_folder(kind: str) -> Path:
    """Where the shipped ``kind`` ("recipes", "profiles", "tokenizers") lives in this install."""
    installed, checkout = _FOLDERS[kind]
    return installed if installed.is_dir() else checkout


def shipped_recipes() -> dict[str, Path]:
    """name -> file of every shipped recipe, sorted by name."""
    return {path.stem: path for path in sorted(shipped_folder("recipes").glob("*.toml"))}


def shipped_tokenizer(name: str) -> Path | None:
    """The folder of a shipped tokenizer (``vlforge:bert-base-uncased``), None if there is none."""
    folder = shipped_folder("tokenizers") / name
    return folder if folder.is_dir() else None


def find_recipe(spec: str) -> str:
    """A recipe file for ``spec``: an existing path or URL as given, else a shipped recipe's name.

    A file in the working directory wins over a shipped recipe of the same name.
    """
    if "://" in spec or Path(spec).exists():
        return spec
    shipped = shipped_recipes().get(spec.removesuffix(".toml"))
    return str(shipped) if shipped and "/" not in spec else spec
