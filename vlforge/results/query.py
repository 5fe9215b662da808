"""Read-only SQL over the index: ``vlforge query``, ``vlforge runs`` and the Python helpers."""

from __future__ import annotations

import atexit
import csv
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

import duckdb
import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlforge.errors import UserError
from vlforge.results.index import INDEX_NAME, build_index
from vlforge.results.rundir import url_join

Format = Literal["table", "csv", "json"]
# Statement types `query` runs; everything else is refused before DuckDB sees it.
_READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "CALL"}
_MAX_CELL = 48  # wider cells are cut in the text table (JSON configs, long reasons)
_downloads: str | None = None  # local copies of indexes that live on object stores


class QueryError(UserError):
    """A query that failed or was refused; the message is meant for the user as is."""


def connect(root: str, *, build: bool = True) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection to ``<root>/index.duckdb`` (built first if missing).

    The connection cannot write the index, attach or copy to other files, nor install or load
    extensions: ``enable_external_access`` is off and the configuration locked. Temporary tables
    and views (in memory) are allowed. An index on an object store is read from a local copy.
    """
    fs, root_path = fsspec.core.url_to_fs(root)
    index_path = url_join(root_path, INDEX_NAME)
    if not fs.exists(index_path):
        if not build:
            raise QueryError(f"no index at {root}: run `vlforge index {root}` first")
        build_index(root)
    local = index_path if isinstance(fs, LocalFileSystem) else _download(fs, index_path)
    con = duckdb.connect(local, read_only=True)
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def query(root: str, sql: str, fmt: Format = "table") -> str:
    """Run one read-only ``sql`` against the index of ``root`` and format the result as text."""
    columns, rows = _fetch(root, sql)
    if fmt == "table":
        return format_table(columns, rows)
    if fmt == "csv":
        return format_csv(columns, rows)
    if fmt == "json":
        return format_json(columns, rows)
    raise QueryError(f"unknown format {fmt!r}; expected table, csv or json")


def query_arrow(root: str, sql: str) -> Any:
    """The result of a read-only query as a ``pyarrow.Table`` (``vlforge query --format parquet``)."""
    con = connect(root)
    try:
        return _execute(con, sql).arrow()
    finally:
        con.close()


def query_df(root: str, sql: str) -> Any:
    """The result of a read-only query as a ``pandas.DataFrame``."""
    con = connect(root)
    try:
        return _execute(con, sql).df()
    finally:
        con.close()


def list_runs(root: str, where: str | None = None, fmt: Format = "table") -> str:
    """``vlforge runs``: one line per run, newest first, filtered by an optional SQL ``where``."""
    sql = (
        "SELECT run_id, experiment, recipe_name, status, start_time, last_step, world_size, "
        "slurm_job_id, left(git_commit, 10) AS git_commit FROM runs"
        + (f" WHERE {where}" if where else "")
        + " ORDER BY start_time DESC, run_id"
    )
    return query(root, sql, fmt)


# -- running ----------------------------------------------------------------------------------


def _fetch(root: str, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(root)
    try:
        rel = _execute(con, sql)
        return (list(rel.columns), rel.fetchall()) if rel is not None else ([], [])
    except duckdb.Error as e:
        raise _translate(e) from e
    finally:
        con.close()


def _execute(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Refuse what is not a read, then run ``sql`` (the last statement's result is returned)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise _translate(e) from e
    for statement in statements:
        kind = statement.type.name
        if kind not in _READ_STATEMENTS:
            raise QueryError(
                f"the index is read-only: {kind} statements are not allowed (queries may SELECT, "
                "EXPLAIN, PRAGMA or CALL; the run directories are the source of truth)"
            )
    try:
        return con.sql(sql)
    except duckdb.Error as e:
        raise _translate(e) from e


def _translate(error: duckdb.Error) -> QueryError:
    message = str(error)
    if "read-only mode" in message:
        return QueryError(f"the index is read-only: {message}")
    if isinstance(error, duckdb.PermissionException):
        return QueryError(f"the index is read-only: other files and extensions are off limits ({message})")
    return QueryError(message)


def _download(fs: fsspec.AbstractFileSystem, index_path: str) -> str:
    """Copy a remote index to a local file (DuckDB opens local files); removed at exit."""
    global _downloads
    if _downloads is None:
        _downloads = tempfile.mkdtemp(prefix="vlforge-index-")
        atexit.register(shutil.rmtree, _downloads, True)
    local = os.path.join(_downloads, f"{uuid.uuid4().hex[:8]}-{INDEX_NAME}")
    fs.get_file(index_path, local)
    return local


# -- formatting -------------------------------------------------------------------------------


def format_table(columns: list[str], rows: list[tuple]) -> str:
    """A fixed-width text table: headers, a rule, numbers right-aligned, and a row count."""
    if not columns:
        return ""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [_numeric_column([row[i] for row in rows]) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    out = [line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def format_csv(columns: list[str], rows: list[tuple]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if v is None else _plain(v) for v in row] for row in rows])
    return buf.getvalue()


def format_json(columns: list[str], rows: list[tuple]) -> str:
    """A JSON list of row objects. NaN and infinities become null: JSON has no spelling for them."""
    return json.dumps([dict(zip(columns, map(_plain, row))) for row in rows], indent=1)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, datetime):
        text = value.isoformat(sep=" ", timespec="seconds")
    elif isinstance(value, list):
        text = ", ".join(map(str, value))
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def _numeric_column(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, (int, float, Decimal)) and not isinstance(v, bool) for v in present
    )
