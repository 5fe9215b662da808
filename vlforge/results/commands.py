"""`vlforge runs | query | index | compare | plot`: the results side of the CLI (imports lazily)."""

from __future__ import annotations

import argparse


def runs_root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-root", help="runs root (any fsspec URL); default $VLFORGE_RUNS or ./runs")


def refresh_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-refresh",
        dest="refresh",
        action="store_false",
        help="read the index as it is, without ingesting what runs wrote since (docs/watching.md)",
    )


def limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="stop the query after this long (default 120; 0: no limit)",
    )
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="DuckDB memory limit, e.g. 4GB (default: $VLFORGE_QUERY_MEMORY or a quarter of this machine)",
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser("runs", help="list runs in the index")
    runs_root_option(runs)
    runs.add_argument("--where", help="SQL condition on the runs table, e.g. \"status = 'failed'\"")
    runs.add_argument("--format", choices=["table", "csv", "json"], default="table")
    refresh_option(runs)
    limit_options(runs)
    runs.set_defaults(func=cmd_runs)

    query = subparsers.add_parser("query", help="run a read-only SQL query on the index")
    query.add_argument("sql")
    runs_root_option(query)
    query.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    query.add_argument("-o", "--output", help="file for --format parquet")
    refresh_option(query)
    limit_options(query)
    query.set_defaults(func=cmd_query)

    index = subparsers.add_parser("index", help="ingest run directories into <root>/index.duckdb")
    index.add_argument("root", nargs="?", help="runs root (default: $VLFORGE_RUNS or ./runs)")
    index.add_argument("--rebuild", action="store_true", help="recreate the index from the run files")
    index.set_defaults(func=cmd_index)

    compare = subparsers.add_parser(
        "compare", help="recipe differences and final metrics of runs side by side"
    )
    compare.add_argument("runs", nargs="+", help="run ids (or unique prefixes)")
    runs_root_option(compare)
    refresh_option(compare)
    compare.set_defaults(func=cmd_compare)

    plot = subparsers.add_parser(
        "plot", help="curves of a train or eval metric for runs, to PNG (default: the latest run)"
    )
    plot.add_argument("metric", help="metric name, e.g. train/loss or retrieval/i2t_r1")
    plot.add_argument("--runs", nargs="+", default=None, help="run ids (or unique prefixes)")
    plot.add_argument("--where", help="SQL condition on the runs table")
    plot.add_argument("--recipe", help="all runs of this recipe (its name)")
    plot.add_argument("--label", help="recipe key whose value labels each curve, e.g. optim.lr")
    plot.add_argument("--smoothing", type=float, default=0.0, help="EMA weight in [0, 1)")
    plot.add_argument("-o", "--output", default="curves.png")
    runs_root_option(plot)
    refresh_option(plot)
    plot.set_defaults(func=cmd_plot)


def _root(args: argparse.Namespace) -> str:
    from vlforge.results.rundir import resolve_root

    root = resolve_root(getattr(args, "runs_root", None) or getattr(args, "root", None))
    if getattr(args, "refresh", False):
        from vlforge.results.live import refresh_index

        refresh_index(root)
    return root


def _limits(args: argparse.Namespace) -> dict:
    return {"timeout": args.timeout, "memory_limit": args.memory_limit}


def cmd_runs(args: argparse.Namespace) -> int:
    from vlforge.results.queries import list_runs

    print(list_runs(_root(args), args.where, args.format, **_limits(args)))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from vlforge.errors import UserError
    from vlforge.results.queries import query, write_parquet

    if args.format == "parquet":
        if not args.output:
            raise UserError("--format parquet writes a file: give it with -o FILE.parquet")
        rows = write_parquet(_root(args), args.sql, args.output, **_limits(args))
        print(f"vlforge: {rows} rows written to {args.output}")
    else:
        print(query(_root(args), args.sql, args.format, **_limits(args)))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from vlforge.results.index import build_index

    print(f"vlforge: index written to {build_index(_root(args), rebuild=args.rebuild)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vlforge.results.queries import compare_runs

    print(compare_runs(_root(args), args.runs))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from vlforge.results.queries import plot_metric

    lines = plot_metric(
        _root(args),
        args.metric,
        args.output,
        run_ids=args.runs,
        where=args.where,
        recipe=args.recipe,
        label=args.label,
        smoothing=args.smoothing,
    )
    print(f"vlforge: {lines} curve(s) of {args.metric} written to {args.output}")
    return 0
