"""Files vlforge ships: recipes, cluster profiles and tokenizers, in a checkout or an installed wheel.

In a checkout they live in the repository (``recipes/``, ``slurm/profiles/``,
``vlforge/tokenizers/``); the wheel maps the first two into the package as
``vlforge/recipes`` and ``vlforge/profiles`` (``pyproject.toml``:
``package-dir``), so the same lookup works in both without copying files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from vlforge.errors import UserError

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
    if "://" in spec or Path(spec).exists() or "/" in spec:
        return spec
    recipes = shipped_recipes()
    shipped = recipes.get(spec.removesuffix(".toml"))
    if shipped is None:
        from vlforge.recipe import Problem, RecipeError
        from vlforge.registry import did_you_mean

        hint = did_you_mean(spec.removesuffix(".toml"), list(recipes))
        message = f"no such file, and no shipped recipe of that name{hint} (shipped: {', '.join(recipes)})"
        raise RecipeError(spec, [Problem("", message, spec)])
    return str(shipped)


# --------------------------------------------------------------------------- `vlforge recipes`


def _description(path: Path) -> str:
    import tomllib

    try:
        return str(tomllib.loads(path.read_text()).get("description", ""))
    except (OSError, tomllib.TOMLDecodeError):
        return ""


def _bases(path: Path) -> list[Path]:
    """The recipe files ``path`` extends, nearest first."""
    import tomllib

    chain = []
    while (base := tomllib.loads(path.read_text()).get("extends")) and isinstance(base, str):
        path = path.parent / base
        chain.append(path)
    return chain


def cmd_recipes(args: argparse.Namespace) -> int:
    recipes = shipped_recipes()
    if args.action is None:
        width = max(map(len, recipes), default=0)
        for name, path in recipes.items():
            print(f"{name:<{width}}  {_description(path)}")
        print(f"({len(recipes)} recipes in {shipped_folder('recipes')}; `vlforge run NAME` runs one)")
        return 0
    if args.action != "cp" or len(args.names) != 2:
        raise UserError("usage: vlforge recipes [cp NAME DEST]")
    return copy_recipe(*args.names)


def copy_recipe(name: str, dest: str) -> int:
    """Copy a shipped recipe (and the recipes it extends, beside it) to edit; never overwrites."""
    from vlforge.registry import did_you_mean

    recipes = shipped_recipes()
    source = recipes.get(name.removesuffix(".toml"))
    if source is None:
        raise UserError(f"no shipped recipe '{name}'{did_you_mean(name, list(recipes))} (`vlforge recipes`)")
    target = Path(dest)
    target = target / source.name if target.is_dir() or dest.endswith("/") else target
    copies = [(source, target)] + [(base, target.parent / base.name) for base in _bases(source)]
    existing = [str(to) for _, to in copies if to.exists()]
    if existing:
        raise UserError(f"not overwriting {', '.join(existing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    for origin, to in copies:
        shutil.copyfile(origin, to)
        print(f"vlforge: copied {origin.name} -> {to}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    recipes = sub.add_parser(
        "recipes", help="list the shipped recipes; `recipes cp NAME DEST` copies one to edit"
    )
    recipes.add_argument("action", nargs="?", choices=["cp"], help="cp: copy a recipe")
    recipes.add_argument("names", nargs="*", metavar="NAME DEST", help="recipe name and destination")
    recipes.set_defaults(func=cmd_recipes)
