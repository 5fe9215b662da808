"""CLI subcommands of this package (added to `vlforge` by vlforge.cli; keep imports light).

``vlforge sweep`` (a job array of runs), ``vlforge status`` (recent Slurm jobs with their
runs), ``vlforge cancel`` and ``vlforge logs`` (a run's log.txt, ``-f`` to follow it).
``vlforge run --launcher slurm`` itself lives in vlforge.cli.
"""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `vlforge` parser."""
    from vlforge.cli import recipe_arguments
    from vlforge.results.commands import runs_root_option

    sweep = subparsers.add_parser("sweep", help="submit a recipe's sweep as one Slurm job array")
    recipe_arguments(sweep)
    sweep.description = "Overrides with several values (key=a,b,...) form a grid, with the recipe's [sweep]."
    runs_root_option(sweep)
    sweep.add_argument("--dry-run", action="store_true", help="print the runs and the sbatch script only")
    sweep.set_defaults(func=_sweep)

    status = subparsers.add_parser("status", help="recent Slurm jobs: Slurm state, run status, step, log")
    runs_root_option(status)
    status.add_argument("-n", "--limit", type=int, default=20, help="this many newest jobs (default 20)")
    status.set_defaults(func=_status)

    cancel = subparsers.add_parser("cancel", help="stop Slurm jobs of runs (checkpoint first)")
    cancel.add_argument("refs", nargs="+", metavar="RUN_OR_JOB", help="run ids or Slurm job ids")
    runs_root_option(cancel)
    cancel.add_argument("--now", action="store_true", help="scancel at once, without a last checkpoint")
    cancel.set_defaults(func=_cancel)

    logs = subparsers.add_parser("logs", help="a run's log.txt (rank 0's output); -f follows it")
    logs.add_argument("run", help="run id or run directory")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    runs_root_option(logs)
    logs.set_defaults(func=_logs)


def _sweep(args: argparse.Namespace) -> int:
    from vlforge.launch.sweep import cmd_sweep

    return cmd_sweep(args)


def _status(args: argparse.Namespace) -> int:
    from vlforge.launch.slurm import read_submissions, status_rows
    from vlforge.results.queries import format_table
    from vlforge.results.rundir import resolve_root

    root = resolve_root(args.runs_root)
    records = read_submissions(root)[: args.limit]
    if not records:
        print(f"no Slurm jobs submitted under {root}")
        return 0
    print(format_table(*status_rows(records)))
    print("logs (rank 0; rank r: _<r>_log.out):")
    for record in records:
        print(f"  {record.job_id}  {record.log}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from vlforge.launch.slurm import cancel
    from vlforge.results.rundir import resolve_root

    for line in cancel(resolve_root(args.runs_root), args.refs, now=args.now):
        print(f"vlforge: {line}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    from vlforge.cli import find_run
    from vlforge.launch.follow import follow_run
    from vlforge.results.rundir import resolve_root

    status = follow_run(find_run(resolve_root(args.runs_root), "", "", args.run), follow=args.follow)
    return 0 if status in (None, "running", "completed") else 1
