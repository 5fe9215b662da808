"""Results: each run writes its own directory; one indexer builds a DuckDB index; queries read it.

See docs/results.md for the layout, the schema and example queries. Names are
imported on first use (PEP 562), so ``import vlforge.results`` does not load
duckdb: the CLI stays fast for commands that never touch the index.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "IndexLockedError": "index",
    "build_index": "index",
    "QueryError": "queries",
    "compare_runs": "queries",
    "connect": "queries",
    "list_runs": "queries",
    "plot_metric": "queries",
    "query": "queries",
    "query_arrow": "queries",
    "query_df": "queries",
    "write_parquet": "queries",
    "RunWriter": "rundir",
    "resolve_root": "rundir",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vlforge.results' has no attribute '{name}'")
    return getattr(importlib.import_module(f"vlforge.results.{_HOMES[name]}"), name)
