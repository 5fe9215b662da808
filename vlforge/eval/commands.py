"""`vlforge eval RUN|CHECKPOINT`: evaluate a checkpoint without training (added to `vlforge` by vlforge.cli).

RUN is a run id or directory (its latest checkpoint); CHECKPOINT a checkpoint
file or folder, inside a run (its evals go to that run, at the checkpoint's
step) or from elsewhere (then ``--recipe`` says how to build the model, and
the evals go to a new eval-only run). The recipe is the run's own
``recipe.toml`` unless ``--recipe`` names another; overrides apply on top
(``evaluators.zeroshot.split=test``, a new ``[evaluators.<name>]`` table...).
It runs on ``launch.nproc`` local ranks, or on Slurm with ``--launcher slurm``.
Keep imports light: no torch until the command runs.
"""

from __future__ import annotations

import argparse
import re

STEP_IN_NAME = re.compile(r"step_(\d+)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from vlforge.results.commands import runs_root_option

    parser = subparsers.add_parser(
        "eval", help="evaluate a run's checkpoint (or any checkpoint) without training"
    )
    parser.add_argument("target", metavar="RUN|CHECKPOINT", help="run id or directory, or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="key.path=value recipe overrides (TOML-typed)")
    parser.add_argument(
        "--evaluator", action="append", default=[], metavar="NAME", help="only this evaluator (repeatable)"
    )
    parser.add_argument("--recipe", help="recipe to build the model from (default: the run's recipe.toml)")
    parser.add_argument("--plugin", action="append", default=[], help="extra plugin module to load")
    parser.add_argument("--launcher", choices=["local", "slurm"], help="override launch.launcher")
    runs_root_option(parser)
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vlforge.eval.target import EvalTarget
    from vlforge.launch.worker import EXIT_CODES, RunJob
    from vlforge.recipe import load_recipe
    from vlforge.results.rundir import new_run_id, resolve_root

    root = resolve_root(args.runs_root)
    run_dir, checkpoint, step = resolve_target(root, args.target)
    if run_dir is None and not args.recipe:
        raise _error(f"{args.target} is not inside a run: give --recipe to build its model from")
    recipe_path = args.recipe or f"{run_dir}/recipe.toml"
    overrides = [*args.overrides, *([f'launch.launcher="{args.launcher}"'] if args.launcher else [])]
    recipe, _ = load_recipe(recipe_path, overrides, tuple(args.plugin))
    if not recipe.evaluators:
        raise _error(f"{recipe_path}: the recipe has no [evaluators.<name>] table to run")
    missing = sorted(set(args.evaluator) - set(recipe.evaluators))
    if missing:
        raise _error(
            f"--evaluator {', '.join(missing)}: not in the recipe "
            f"(evaluators: {', '.join(recipe.evaluators)})"
        )
    target = EvalTarget(checkpoint, step, into_run=run_dir is not None, evaluators=tuple(args.evaluator))
    if run_dir is not None:
        experiment, run_id = run_dir.rstrip("/").split("/")[-2:]
        root = run_dir.rstrip("/").rsplit("/", 2)[0]
    else:
        experiment, run_id = recipe.experiment, new_run_id()
    job = RunJob(recipe_path, tuple(overrides), root, experiment, run_id, extra_plugins=tuple(args.plugin))
    job = replace(job, evaluate=target)
    where = f"run {run_id}" if target.into_run else f"new eval-only run {run_id}"
    print(f"vlforge: evaluating {checkpoint} (step {step}) -> {where}")
    if recipe.launch.launcher == "slurm":
        from vlforge.launch.slurm import PlannedRun, ensure_fits, plan_launch, print_submissions, submit

        plan = plan_launch(recipe, recipe_path, root)
        ensure_fits(plan, recipe_path)
        print_submissions(submit(plan, [PlannedRun(job, recipe)], root), plan)
        return 0
    from vlforge.cli import _print_run_summary
    from vlforge.launch.local import launch_local

    status = launch_local(job, recipe.launch.processes_per_node * recipe.launch.nodes)
    _print_run_summary(root, run_id, status, step)
    return EXIT_CODES.get(status, 1)


def resolve_target(root: str, target: str) -> tuple[str | None, str, int]:
    """(run directory or None for a foreign checkpoint, checkpoint URL, its step)."""
    import fsspec

    from vlforge.checkpoint import list_checkpoints

    fs, path = fsspec.core.url_to_fs(target)
    if not fs.exists(path):
        from vlforge.cli import find_run

        run_dir = find_run(root, "", "", target)  # a run id under the runs root
    elif fs.exists(f"{path}/status.json"):
        run_dir = target
    else:
        run_dir = _enclosing_run(fs, path, remote="://" in target)
        found = {
            fsspec.core.url_to_fs(url)[1].rstrip("/"): step for step, url in list_checkpoints(run_dir or "")
        }
        if run_dir is not None and path.rstrip("/") in found:
            return run_dir, target, found[path.rstrip("/")]
        match = STEP_IN_NAME.search(path.rsplit("/", 1)[-1])
        return run_dir, target, int(match.group(1)) if match else 0
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise _error(f"run {run_dir} has no checkpoint to evaluate")
    step, url = checkpoints[-1]
    return run_dir, url, step


def _enclosing_run(fs, path: str, remote: bool) -> str | None:
    """The run directory holding ``path`` (the nearest parent with a status.json), if any."""
    parts = path.rstrip("/").split("/")
    for end in range(len(parts) - 1, 0, -1):
        parent = "/".join(parts[:end])
        if fs.exists(f"{parent}/status.json"):
            return fs.unstrip_protocol(parent) if remote else parent
    return None


def _error(message: str) -> Exception:
    from vlforge.errors import UserError

    return UserError(message)
