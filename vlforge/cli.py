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
    "vlforge.checkpoint.commands",
    "vlforge.eval.commands",
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
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="build on the meta device and print the plan: memory per GPU, FLOPs, time, GPU-hours",
    )
    run.add_argument(
        "--format", choices=["table", "json"], default="table", help="--dry-run: the plan as a table or JSON"
    )
    run.add_argument(
        "--strict", action="store_true", help="refuse (exit 2) a recipe whose plan does not fit in GPU memory"
    )
    run.add_argument("--launcher", choices=["local", "slurm"], help="override launch.launcher")
    run.add_argument(
        "--follow", action="store_true", help="Slurm: after submitting, show the run's log until it ends"
    )
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


def _load(args: argparse.Namespace, *, check_resources: bool = False):
    from vlforge.recipe import load_recipe
    from vlforge.resources import find_recipe

    args.recipe = find_recipe(args.recipe)  # a shipped recipe's name -> its file, for every later step
    return load_recipe(args.recipe, args.overrides, tuple(args.plugin), check_resources=check_resources)


def cmd_validate(args: argparse.Namespace) -> int:
    recipe, _ = _load(args, check_resources=True)
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
    recipe, plugins = _load(args, check_resources=True)
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
        return dry_run(recipe, plugins, plan, root, fmt=args.format, strict=args.strict)
    if args.strict:
        check_plan_fits(recipe, plugins, plan)
    from vlforge.launch.worker import EXIT_CODES, RunJob

    if args.resume:
        run_dir = find_run(root, recipe.experiment, recipe.name, args.resume)
        refuse_resume_overrides(run_dir, overrides)
        from vlforge.results.rundir import take_run_lock

        take_run_lock(run_dir, check_only=True)  # refuse a resume of a live run before launching
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
        (record,) = submit(plan, [PlannedRun(job, recipe)], root)
        print_submissions([record], plan)
        if args.follow:
            from vlforge.launch.follow import follow_run

            return EXIT_CODES.get(follow_run(record.run_dir, job_id=record.job_id) or "failed", 1)
        return 0
    from vlforge.launch.local import launch_local

    print(f"vlforge: run {job.run_id} -> {job.run_dir}")
    status = launch_local(job, recipe.launch.processes_per_node * recipe.launch.nodes)
    _print_run_summary(root, job.run_id, status)
    return EXIT_CODES.get(status, 1)


def refuse_resume_overrides(run_dir: str, overrides: list[str]) -> None:
    """A resumed run trains what it started with: ``launch.*`` may change, nothing else.

    An override that repeats the run's own value (the command line it started with) is
    fine; one that would change the recipe is refused rather than silently ignored.
    """
    from vlforge.recipe import flatten, parse_override, read_toml

    saved = flatten(read_toml(f"{run_dir}/recipe.toml").data)  # the resolved recipe: every key is there
    changed = []
    for text in overrides:
        if text.startswith("~"):  # a deletion changes the recipe unless it is launch.*
            if not text.startswith("~launch."):
                changed.append(f"{text.strip()} (the run has {text[1:]})")
            continue
        key, value = parse_override(text)
        wanted = flatten({key: value})  # a table override: each of its keys
        if key.startswith("launch.") or all(saved.get(k, _ABSENT) == v for k, v in wanted.items()):
            continue
        has = ", ".join(f"{k} = {saved[k]!r}" if k in saved else f"no {k}" for k in wanted)
        changed.append(f"{text.strip()} (the run has {has})")
    if changed:
        raise UserError(
            f"--resume continues run {run_dir} with the recipe it started with; it cannot apply "
            f"{'; '.join(changed)}. Only launch.* may change on resume: start a new run to change "
            "anything else (model.init_from=<run dir> starts it from this run's weights)"
        )


_ABSENT = object()


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


def _print_run_summary(root: str, run_id: str, status: str, step: int | None = None) -> None:
    """The run's evals at ``step`` (default its last evaluated step)."""
    from vlforge.results.queries import query

    print(f"vlforge: run {run_id} {status}")
    at = step if step is not None else f"(SELECT max(step) FROM evals WHERE run_id = '{run_id}')"
    sql = (
        "SELECT evaluator, metric, round(value, 4) AS value FROM evals "
        f"WHERE run_id = '{run_id}' AND step = {at} "
        "ORDER BY evaluator, metric"
    )
    try:
        print(query(root, sql, "table"))
    except Exception as exc:  # the summary is a courtesy; the run itself is saved
        print(f"vlforge: could not read the index ({exc})")


def planned_world(recipe, slurm_plan=None) -> int:
    return slurm_plan.world_size if slurm_plan else recipe.launch.processes_per_node * recipe.launch.nodes


def plan_profile(recipe, slurm_plan=None):
    """The cluster profile the plan compares against: the Slurm plan's, or ``launch.profile``'s."""
    if slurm_plan is not None:
        return slurm_plan.profile
    if not recipe.launch.profile:
        return None
    from vlforge.launch.profiles import find_profile, load_profile, unknown_profile

    path = find_profile(recipe.launch.profile)
    if path is None:
        raise UserError(f"launch.profile: {unknown_profile(recipe.launch.profile)}")
    return load_profile(path)


def build_plan(recipe, plugins, slurm_plan=None, root: str | None = None):
    """The meta-built model and its memory/time plan at the planned world size."""
    from vlforge.components import BuildContext
    from vlforge.model import build_model
    from vlforge.plan import make_plan, measured_step_time

    world = planned_world(recipe, slurm_plan)
    profile = plan_profile(recipe, slurm_plan)
    model = build_model(recipe, plugins, BuildContext(recipe, world_size=world, device="meta", meta=True))
    measured = measured_step_time(root, recipe, world, recipe.launch.profile) if root else {}
    return model, make_plan(recipe, plugins, model, world, profile, measured)


def check_plan_fits(recipe, plugins, slurm_plan=None) -> None:
    """``--strict``: refuse a recipe whose plan does not fit in the profile's GPU memory."""
    from vlforge.plan import format_plan

    _, plan = build_plan(recipe, plugins, slurm_plan)
    if plan.fits is False:
        raise UserError(f"{recipe.name} does not fit in GPU memory (--strict):\n{format_plan(plan)}")


def dry_run(recipe, plugins, slurm_plan=None, root=None, fmt: str = "table", strict: bool = False) -> int:
    """Build the model on the meta device and print sizes, the memory and time plan, the launch plan."""
    import json

    from vlforge.model import parameter_counts
    from vlforge.plan import format_plan

    world = planned_world(recipe, slurm_plan)
    model, plan = build_plan(recipe, plugins, slurm_plan, root)
    counts = parameter_counts(model)
    fits = plan.fits is not False or not strict
    if fmt == "json":
        data = {"parameters": {part: {"total": n, "trainable": t} for part, (n, t) in counts.items()}}
        print(json.dumps(data | plan.to_dict(), indent=2))
        return 0 if fits else 2
    total = sum(t for t, _ in counts.values())
    trainable = sum(t for _, t in counts.values())
    print(f"recipe {recipe.name} (experiment {recipe.experiment})")
    for part, (n, t) in counts.items():
        print(f"  {part:<12} {n / 1e6:10.2f}M parameters ({t / 1e6:.2f}M trainable)")
    print(f"  {'total':<12} {total / 1e6:10.2f}M parameters ({trainable / 1e6:.2f}M trainable)")
    train = recipe.train
    print(f"steps {train.steps} ({train.steps * train.batch_size:,} samples), precision {train.precision}")
    print(format_plan(plan))
    if plan.fits is False:
        verb = "refused (--strict)" if strict else "warning"
        print(
            f"vlforge: {verb}: {recipe.name} does not fit in {plan.gpu_memory_gb:g} GB per GPU",
            file=sys.stderr,
        )
    if not fits:
        return 2
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
