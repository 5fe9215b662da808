"""Sweeps: many runs of one recipe, submitted as one Slurm job array.

The runs come from the recipe's ``[sweep]`` table (``grid``: the product of value lists;
``points``: one table per run) and from ``vlforge sweep R key=a,b ...`` on the command line
(a grid; a key given there replaces the same key of the recipe's grid). Each element is its
own run with its own id; its recipe records its place in the array and its overrides
(``sweep.index``, ``sweep.overrides``), so the index can group and compare them. Every
element is validated before anything is submitted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tomllib
from typing import Any

from vlforge.errors import UserError
from vlforge.recipe import Recipe, RecipeError, SweepSection, flatten, load_recipe


def split_sweep_args(args: list[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """Command-line ``key=value`` items -> (plain overrides, grid axes ``key=a,b,...``).

    Values are TOML (``lr=1e-3,3e-3``, ``betas=[0.9,0.95],[0.9,0.98]``); bare words are strings
    (``name=a,b``). One value is a plain override, as in ``vlforge run``.
    """
    plain, grid = [], {}
    for item in args:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"'{item}' is not of the form key.path=value or key.path=a,b,...")
        try:
            values = tomllib.loads(f"v = [{text}]")["v"]
        except tomllib.TOMLDecodeError:
            values = [word.strip() for word in text.split(",")]
        if len(values) > 1:
            grid[key.strip()] = values
        else:
            plain.append(item)
    return plain, grid


def sweep_points(section: SweepSection | None, cli_grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every element as {recipe key: value}, in array order: recipe points × command-line grid."""
    section = section or SweepSection()
    if section.grid and section.points:
        raise UserError("[sweep] has both grid and points: use one of them")
    grid = {key: values for key, values in flatten(section.grid or {}).items() if key not in cli_grid}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep.grid.{key} must be a non-empty list of values")
    base = [flatten(point) for point in section.points or []] or _product(grid)
    return [{**point, **extra} for point in base for extra in _product(cli_grid)]


def _product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (for overrides)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def element_overrides(point: dict[str, Any], index: int) -> list[str]:
    """Overrides that make element ``index``: its values, and its record in ``[sweep]``."""
    values = [f"{key}={toml_value(value)}" for key, value in point.items()]
    return [*values, f"sweep={toml_value({'index': index, 'overrides': point})}"]


def load_elements(args: argparse.Namespace, plain: list[str], points: list[dict[str, Any]]) -> list[Recipe]:
    """Every element's validated recipe; raises one error listing all elements' problems."""
    recipes, problems = [], []
    for index, point in enumerate(points):
        try:
            overrides = [*plain, *element_overrides(point, index)]
            recipes.append(load_recipe(args.recipe, overrides, tuple(args.plugin))[0])
        except RecipeError as exc:
            problems += [f"  - element {index} {point}: {p}" for p in exc.problems]
    if problems:
        raise UserError(f"sweep of {args.recipe}: {len(problems)} problem(s)\n" + "\n".join(problems))
    launches = {json.dumps(r.launch.model_dump(), sort_keys=True) for r in recipes}
    if len(launches) > 1:
        raise UserError("launch.* cannot vary within a sweep: its runs share one job array")
    return recipes


def cmd_sweep(args: argparse.Namespace) -> int:
    from vlforge.launch.slurm import (
        PlannedRun,
        ensure_fits,
        plan_launch,
        print_dry_run,
        print_submissions,
        submit,
    )
    from vlforge.launch.worker import RunJob
    from vlforge.results.rundir import new_run_id, resolve_root

    plain, cli_grid = split_sweep_args(args.overrides)
    plain.append('launch.launcher="slurm"')
    base, _ = load_recipe(args.recipe, plain, tuple(args.plugin))
    points = sweep_points(base.sweep, cli_grid)
    if len(points) < 2:
        raise UserError(f"nothing to sweep: add a [sweep] table to {args.recipe} or give key=a,b,...")
    recipes = load_elements(args, plain, points)
    root = resolve_root(args.runs_root)
    plan = plan_launch(recipes[0], args.recipe, root)
    ensure_fits(plan, args.recipe)
    labels = [tuple(f"{k}={toml_value(v)}" for k, v in point.items()) for point in points]
    if args.dry_run:
        print(f"sweep of {args.recipe}: {len(points)} runs in one job array")
        for index, label in enumerate(labels):
            print(f"  [{index}] {' '.join(label)}")
        return print_dry_run(plan, recipes[0], array_size=len(points))
    runs = [
        PlannedRun(
            RunJob(
                args.recipe,
                tuple([*plain, *element_overrides(point, index)]),
                root,
                recipe.experiment,
                new_run_id(),
                extra_plugins=tuple(args.plugin),
            ),
            recipe,
            label,
        )
        for index, (point, recipe, label) in enumerate(zip(points, recipes, labels))
    ]
    print_submissions(submit(plan, runs, root), plan)
    return 0
