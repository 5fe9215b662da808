"""Results: each run writes its own directory; one indexer builds a DuckDB index; queries read it.

See docs/results.md for the layout, the schema and example queries.
"""

from vlforge.results.index import IndexLockedError, build_index
from vlforge.results.query import (
    QueryError,
    compare_runs,
    connect,
    list_runs,
    plot_metric,
    query,
    query_arrow,
    query_df,
    write_parquet,
)
from vlforge.results.rundir import RunWriter, resolve_root

__all__ = [
    "IndexLockedError",
    "QueryError",
    "RunWriter",
    "build_index",
    "compare_runs",
    "connect",
    "list_runs",
    "plot_metric",
    "query",
    "query_arrow",
    "query_df",
    "resolve_root",
    "write_parquet",
]
