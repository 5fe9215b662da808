"""`vlforge ...`: run, validate, show, plugins; results, launch and data commands come from their packages.

Imports stay lazy per subcommand: ``vlforge --help``, ``validate``, ``show``
and ``plugins`` never import torch. User errors (a bad recipe, a missing
file, a plugin that fails to import, a write statement in a query) print one
clear message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from vlforge.errors import UserError, VlforgeError
from vlforge.results.commands import runs_root_option

EXTENSION_MODULES = (
    "vlforge.results.commands",
    "vlforge.launch.commands",
    "vlforge.data.commands",
    "vlforge.resources",
    "vlforge.weights.commands",
)


def recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe TOML file, or a shipped recipe's name (`vlforge recipes`)")
    parser.add_argument("overrides", nargs="*", help="key.path=value (TOML-typed), e.g. optim.lr=3e-4")
    parser.add_argument("--plugin", action="append", default=[], help="extra plugin module to load")


def build_parser() -> argparse.ArgumentParser:
    from vlforge import __version__

    parser = argparse.ArgumentParser(prog="vlforge", description="Vision-language pretraining experiments.")
    parser.add_argument("--version", action="version", version=f"vlforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train a recipe")
    recipe_arguments(run)
    runs_root_option(run)
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN",
        help="continue a run: its id, its directory, or (no value) the latest unfinished run of this recipe",
    )
    run.add_argument("--dry-run", action="store_true", help="build on the meta device and print the plan")
    run.add_argument("--launcher", choices=["local", "slurm"], help="override launch.launcher")
    run.set_defaults(func=cmd_run)

    for name, func, text in [
        ("validate", cmd_validate, "check a recipe"),
        ("show", cmd_show, "print the resolved recipe"),
    ]:
        p = sub.add_parser(name, help=text)
        recipe_arguments(p)
        p.set_defaults(func=func)

    plugins = sub.add_parser("plugins", help="list registered components with their fields and defaults")
    plugins.add_argument("--kind", help="only this component kind")
    plugins.set_defaults(func=cmd_plugins)

    # Subsystems add their own subcommands; these modules must stay light (no torch import).
    for module in EXTENSION_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


# --------------------------------------------------------------------------- recipe commands


def _load(args: argparse.Namespace):
    from vlforge.recipe import load_recipe
    from vlforge.resources import find_recipe

    args.recipe = find_recipe(args.recipe)  # a shipped recipe's name -> its file, for every later step
    return load_recipe(args.recipe, args.overrides, tuple(args.plugin))


def cmd_validate(args: argparse.Namespace) -> int:
    recipe, _ = _load(args)
    print(f"{args.recipe}: ok ({recipe.name}, {len(recipe.component_tables())} components)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    recipe, _ = _load(args)
    print(recipe.to_toml(), end="")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from vlforge.plugins import load_plugins
    from vlforge.registry import KINDS

    plugins = load_plugins(origin="--plugin")
    if args.kind and args.kind not in KINDS:
        from vlforge.registry import did_you_mean

        raise UserError(
            f"unknown kind '{args.kind}'{did_you_mean(args.kind, KINDS)} (kinds: {', '.join(KINDS)})"
        )
    for component in plugins.registry:
        if args.kind and component.kind != args.kind:
            continue
        print(f"{component.kind}  {component.name}  — {component.summary}")
        print(f"    from {component.source}")
        for field, info in component.config.model_fields.items():
            default = (
                "required" if info.is_required() else f"= {info.get_default(call_default_factory=True)!r}"
            )
            kind = getattr(info.annotation, "__name__", str(info.annotation)).replace("typing.", "")
            print(f"    {field}: {kind} {default}")
    return 0


# --------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    from vlforge.results.rundir import new_run_id, resolve_root

    overrides = list(args.overrides) + ([f'launch.launcher="{args.launcher}"'] if args.launcher else [])
    args.overrides = overrides
    recipe, plugins = _load(args)
    if recipe.sweep and (recipe.sweep.grid or recipe.sweep.points):
        raise UserError(f"{args.recipe} defines a [sweep]: submit it with `vlforge sweep {args.recipe}`")
    root = resolve_root(args.runs_root)
    plan = None
    if recipe.launch.launcher == "slurm":
        from vlforge.launch.slurm import check_cluster, ensure_fits, plan_launch

        plan = plan_launch(recipe, args.recipe, root)  # refuses what cannot run, before building anything
        if args.dry_run:
            # A dry run often plans for another cluster than the one `sinfo` reaches here: warn only.
            for problem in check_cluster(plan, args.recipe):
                print(
                    f"vlforge: warning: the cluster reachable from here would refuse this: {problem}",
                    file=sys.stderr,
                )
        else:
            ensure_fits(plan, args.recipe)  # against the cluster, when sinfo answers
    if args.dry_run:
        return dry_run(recipe, plugins, plan)
    from vlforge.launch.worker import EXIT_CODES, RunJob

    if args.resume:
        run_dir = find_run(root, recipe.experiment, recipe.name, args.resume)
        experiment, run_id = run_dir.rstrip("/").split("/")[-2:]
        job = RunJob(
            f"{run_dir}/recipe.toml",
            (),
            root,
            experiment,
            run_id,
            resume=True,
            extra_plugins=tuple(args.plugin),
        )
        print(f"vlforge: resuming run {run_id} from {run_dir}")
    else:
        job = RunJob(
            args.recipe,
            tuple(overrides),
            root,
            recipe.experiment,
            new_run_id(),
            extra_plugins=tuple(args.plugin),
        )
    if plan is not None:
        from vlforge.launch.slurm import PlannedRun, ensure_fits, plan_launch, print_submissions, submit
        from vlforge.recipe import load_recipe

        if args.resume:  # train what the run started with; only where it runs (launch.*) may change
            launch = [o for o in overrides if o.startswith("launch.")]
            recipe, _ = load_recipe(job.recipe_path, launch, tuple(args.plugin))
            plan = plan_launch(recipe, job.recipe_path, root)
            ensure_fits(plan, job.recipe_path)
        print_submissions(submit(plan, [PlannedRun(job, recipe)], root), plan)
        return 0
    from vlforge.launch.local import launch_local

    print(f"vlforge: run {job.run_id} -> {job.run_dir}")
    status = launch_local(job, recipe.launch.processes_per_node * recipe.launch.nodes)
    _print_run_summary(root, job.run_id, status)
    return EXIT_CODES.get(status, 1)


def find_run(root: str, experiment: str, recipe_name: str, ref: str) -> str:
    """A run directory from an id, a directory, or 'latest' (newest unfinished run of the recipe)."""
    import fsspec

    from vlforge.results.rundir import read_json

    fs, base = fsspec.core.url_to_fs(root)
    if ref != "latest":
        if fs.exists(f"{fsspec.core.url_to_fs(ref)[1]}/status.json"):
            return ref
        matches = fs.glob(f"{base}/*/{ref}/status.json")
        if not matches:
            raise UserError(f"no run '{ref}' under {root}")
        return fs.unstrip_protocol(matches[0].rsplit("/", 1)[0])
    candidates = []
    for path in fs.glob(f"{base}/{experiment}/*/status.json"):
        status = read_json(fs, path)
        if status.get("recipe_name") == recipe_name and status.get("status") != "completed":
            candidates.append((status.get("start_time", ""), path.rsplit("/", 1)[0]))
    if not candidates:
        raise UserError(f"no unfinished run of recipe '{recipe_name}' in {root}/{experiment} to resume")
    return fs.unstrip_protocol(max(candidates)[1])


def _print_run_summary(root: str, run_id: str, status: str) -> None:
    from vlforge.results.queries import query

    print(f"vlforge: run {run_id} {status}")
    sql = (
        "SELECT evaluator, metric, round(value, 4) AS value FROM evals "
        f"WHERE run_id = '{run_id}' AND step = (SELECT max(step) FROM evals WHERE run_id = '{run_id}') "
        "ORDER BY evaluator, metric"
    )
    try:
        print(query(root, sql, "table"))
    except Exception as exc:  # the summary is a courtesy; the run itself is saved
        print(f"vlforge: could not read the index ({exc})")


def dry_run(recipe, plugins, slurm_plan=None) -> int:
    """Build the model on the meta device and print sizes and the launch plan."""
    from vlforge.components import BuildContext
    from vlforge.model import build_model, parameter_counts

    world = slurm_plan.world_size if slurm_plan else recipe.launch.processes_per_node * recipe.launch.nodes
    ctx = BuildContext(recipe, world_size=world, device="meta", meta=True)
    model = build_model(recipe, plugins, ctx)
    counts = parameter_counts(model)
    total = sum(t for t, _ in counts.values())
    trainable = sum(t for _, t in counts.values())
    print(f"recipe {recipe.name} (experiment {recipe.experiment})")
    for part, (n, t) in counts.items():
        print(f"  {part:<12} {n / 1e6:10.2f}M parameters ({t / 1e6:.2f}M trainable)")
    print(f"  {'total':<12} {total / 1e6:10.2f}M parameters ({trainable / 1e6:.2f}M trainable)")
    train = recipe.train
    print(f"steps {train.steps} ({train.steps * train.batch_size:,} samples), precision {train.precision}")
    if slurm_plan is not None:
        from vlforge.launch.slurm import print_dry_run

        return print_dry_run(slurm_plan, recipe)
    print(f"world size {world} ({recipe.launch.nodes} node(s) × {world // recipe.launch.nodes} process(es))")
    print(
        f"global batch {train.batch_size} = {world} ranks × {train.accum_steps} accumulation × "
        f"{train.batch_size // (world * train.accum_steps)} per rank"
    )
    print(f"launcher {recipe.launch.launcher}: would start {world} process(es); nothing was submitted")
    return 0


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow options (`run r.toml --dry-run a.b=1`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    # `~a.b` deletes an inherited key.
    is_override = lambda e: ("=" in e and not e.startswith("-")) or e.startswith("~")  # noqa: E731
    if extra and (not hasattr(args, "overrides") or not all(map(is_override, extra))):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except VlforgeError as exc:
        print(f"vlforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `vlforge runs | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
