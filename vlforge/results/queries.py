"""Read-only SQL over the index: ``vlforge query``, ``vlforge runs`` and the Python helpers."""

from __future__ import annotations

import atexit
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

import duckdb
import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlforge.errors import UserError, VlforgeError
from vlforge.results.index import INDEX_NAME, build_index, first_line
from vlforge.results.rundir import TMP_SUFFIX, url_join

Format = Literal["table", "csv", "json"]
# Statement types `query` runs; everything else is refused before DuckDB sees it.
_READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "CALL"}
_MAX_CELL = 48  # wider cells are cut in the text table (JSON configs, long reasons)
_scratch: str | None = None  # local copies of remote indexes, and DuckDB's spill files
DEFAULT_TIMEOUT_S = 120.0  # a query running longer is stopped (`--timeout`, `timeout=`; 0: none)
MAX_ROWS = 1_000_000  # rows a text/CSV/JSON result may have: they are held in Python memory
MEMORY_ENV = "VLFORGE_QUERY_MEMORY"  # DuckDB's memory limit for queries, e.g. "4GB"


class QueryError(UserError):
    """A query that failed or was refused; the message is meant for the user as is."""


class QueryInterrupted(VlforgeError):
    """Ctrl-C stopped a query (through DuckDB's interrupt)."""

    exit_code = 130


def default_memory_limit() -> str:
    """``$VLFORGE_QUERY_MEMORY``, else a quarter of this machine's memory.

    DuckDB's own default is 80 %, which leaves a shared login node or laptop unusable.
    """
    if os.environ.get(MEMORY_ENV):
        return os.environ[MEMORY_ENV]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{max(total // 4 >> 20, 256)}MiB"


def connect(root: str, *, build: bool = True, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection to ``<root>/index.duckdb`` (built first if missing).

    The database is opened in read-only mode, so nothing the caller executes can write it, nor
    any file attached later; ``enable_external_access`` is off (no other files, no COPY … TO, no
    INSTALL/LOAD) and the configuration is locked so neither can be turned back on. Temporary
    tables and views (in memory) are allowed. ``memory_limit`` (DuckDB syntax, ``"4GB"``; default
    :func:`default_memory_limit`) bounds what queries use. A damaged index is rebuilt from the run
    directories (``build=False``: :class:`QueryError`). An index on an object store is read from
    a local copy.
    """
    fs, root_path = fsspec.core.url_to_fs(root)
    index_path = url_join(root_path, INDEX_NAME)
    if not fs.exists(index_path):
        if not build:
            raise QueryError(f"no index at {root}: run `vlforge index {root}` first")
        build_index(root)
    limit = memory_limit or default_memory_limit()
    try:
        return _open_read_only(fs, index_path, limit)
    except _DAMAGED as e:
        problem = f"the index {index_path} is damaged ({first_line(e)})"
        if not build:
            raise QueryError(
                f"{problem}: rebuild it from the run directories with `vlforge index --rebuild {root}`"
            ) from None
        print(f"vlforge: warning: {problem}; rebuilding it from the run directories", file=sys.stderr)
    build_index(root, rebuild=True)
    return _open_read_only(fs, index_path, limit)


# What opening a file that is not a (whole) DuckDB database raises; other errors (a bad memory
# limit) are the caller's.
_DAMAGED = (duckdb.IOException, duckdb.SerializationException, duckdb.InternalException)


def _open_read_only(
    fs: fsspec.AbstractFileSystem, index_path: str, memory_limit: str
) -> duckdb.DuckDBPyConnection:
    config = {
        "enable_external_access": False,
        "memory_limit": memory_limit,
        "temp_directory": os.path.join(_scratch_dir(), uuid.uuid4().hex[:8]),  # spills, if any
        "lock_configuration": True,
    }
    path, is_link = _private_path(fs, index_path)
    try:
        return duckdb.connect(path, read_only=True, config=config)
    except duckdb.ParserException as e:  # the one setting users give: the memory limit
        raise QueryError(f"bad memory limit {memory_limit!r}: {e}") from None
    finally:
        if is_link:
            os.remove(path)


def _private_path(fs: fsspec.AbstractFileSystem, index_path: str) -> tuple[str, bool]:
    """A local path to the current index that no other connection of this process uses, and
    whether it is a hard link to remove once the file is open.

    duckdb.connect(path) shares one cached instance per (resolved) path within a process, and a
    cached instance keeps reading the file it first opened after the indexer has replaced it.
    """
    if not isinstance(fs, LocalFileSystem):
        return _download(fs, index_path), False
    alias = f"{index_path}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        os.link(index_path, alias)
    except OSError:  # a read-only runs root: share the cached instance
        return index_path, False
    return alias, True


def query(
    root: str,
    sql: str,
    fmt: Format = "table",
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_limit: str | None = None,
) -> str:
    """Run one read-only ``sql`` against the index of ``root`` and format the result as text.

    Stopped after ``timeout`` seconds (0: no limit) or by Ctrl-C; ``memory_limit`` as in
    :func:`connect`. A result of more than :data:`MAX_ROWS` rows is refused (write it to Parquet).
    """
    columns, rows = _fetch(root, sql, timeout, memory_limit)
    if fmt == "table":
        return format_table(columns, rows)
    if fmt == "csv":
        return format_csv(columns, rows)
    if fmt == "json":
        return format_json(columns, rows)
    raise QueryError(f"unknown format {fmt!r}; expected table, csv or json")


def query_arrow(
    root: str, sql: str, *, timeout: float = DEFAULT_TIMEOUT_S, memory_limit: str | None = None
) -> Any:
    """The result of a read-only query as a ``pyarrow.Table``."""
    return _run(root, sql, lambda rel: rel.to_arrow_table(), timeout, memory_limit)


def query_df(
    root: str, sql: str, *, timeout: float = DEFAULT_TIMEOUT_S, memory_limit: str | None = None
) -> Any:
    """The result of a read-only query as a ``pandas.DataFrame``."""
    return _run(root, sql, lambda rel: rel.df(), timeout, memory_limit)


def list_runs(
    root: str,
    where: str | None = None,
    fmt: Format = "table",
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_limit: str | None = None,
) -> str:
    """``vlforge runs``: one line per run, newest first, filtered by an optional SQL ``where``."""
    sql = (
        "SELECT run_id, experiment, recipe_name, status, start_time, last_step, world_size, "
        "slurm_job_id, left(git_commit, 10) AS git_commit FROM runs"
        + (f" WHERE {where}" if where else "")
        + " ORDER BY start_time DESC, run_id"
    )
    return query(root, sql, fmt, timeout=timeout, memory_limit=memory_limit)


# -- running ----------------------------------------------------------------------------------


def _fetch(root: str, sql: str, timeout: float, memory_limit: str | None) -> tuple[list[str], list[tuple]]:
    def fetch(rel: duckdb.DuckDBPyRelation | None) -> tuple[list[str], list[tuple]]:
        if rel is None:
            return [], []
        rows = rel.limit(MAX_ROWS + 1).fetchall()  # Python rows cost ~100 B a value: bound them
        if len(rows) > MAX_ROWS:
            raise QueryError(
                f"the result has more than {MAX_ROWS:,} rows: add a LIMIT or an aggregate, or write it "
                "to a file with --format parquet -o FILE.parquet"
            )
        return list(rel.columns), rows

    return _run(root, sql, fetch, timeout, memory_limit)


def _run(
    root: str,
    sql: str,
    fetch: Callable[[duckdb.DuckDBPyRelation | None], Any],
    timeout: float,
    memory_limit: str | None = None,
) -> Any:
    con = connect(root, memory_limit=memory_limit)
    try:
        return run_interruptible(con, lambda: fetch(_execute(con, sql)), timeout)
    except duckdb.Error as e:  # raised while fetching: relations run lazily
        raise _translate(e) from e
    finally:
        con.close()


def run_interruptible(con: duckdb.DuckDBPyConnection, work: Callable[[], Any], timeout: float) -> Any:
    """``work()`` (queries on ``con``), stopped by DuckDB's interrupt after ``timeout`` s or on Ctrl-C.

    The work runs in a thread and this one waits: a signal reaches Python only between bytecodes
    of the main thread, which a long query in the main thread would never reach. Raises
    :class:`QueryError` on the time limit and :class:`QueryInterrupted` on Ctrl-C.
    """
    outcome: dict[str, Any] = {}
    # Done is an Event, not Thread.is_alive(): a KeyboardInterrupt inside Thread.join can leave
    # is_alive() False while the thread still runs (CPython gh-90882).
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e
        finally:
            done.set()

    deadline = time.monotonic() + timeout if timeout else math.inf
    threading.Thread(target=target, name="vlforge-query", daemon=True).start()
    try:
        while not done.wait(min(0.05, max(deadline - time.monotonic(), 0.0))) and time.monotonic() < deadline:
            pass
    except KeyboardInterrupt:
        _stop(con, done)
        raise QueryInterrupted("query interrupted (Ctrl-C)") from None
    if not done.is_set():
        _stop(con, done)
        raise QueryError(
            f"the query was stopped after its time limit of {timeout:g} s "
            "(give more with --timeout SECONDS, or timeout= in Python; 0 for none)"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _stop(con: duckdb.DuckDBPyConnection, done: threading.Event) -> None:
    """Interrupt the running query and wait for it to end (a second Ctrl-C does not cut this short)."""
    con.interrupt()
    while not done.is_set():
        try:
            done.wait(0.05)
        except KeyboardInterrupt:
            con.interrupt()


def _execute(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Refuse what is not a read, then run ``sql`` (the last statement's result is returned)."""
    _refuse_writes(con, sql)
    try:
        return con.sql(sql)
    except duckdb.Error as e:
        raise _translate(e) from e


def _refuse_writes(con: duckdb.DuckDBPyConnection, sql: str) -> None:
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


def _translate(error: duckdb.Error) -> QueryError:
    message = str(error)
    if "read-only mode" in message:
        return QueryError(f"the index is read-only: {message}")
    if isinstance(error, duckdb.PermissionException):
        return QueryError(f"the index is read-only: other files and extensions are off limits ({message})")
    if isinstance(error, duckdb.OutOfMemoryException):
        return QueryError(
            f"the query needs more memory than its limit ({first_line(error)}); raise it with "
            f"--memory-limit or ${MEMORY_ENV}, or make the query smaller"
        )
    return QueryError(message)


def _scratch_dir() -> str:
    """This process's private temporary directory (removed at exit)."""
    global _scratch
    if _scratch is None:
        _scratch = tempfile.mkdtemp(prefix="vlforge-index-")
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def _download(fs: fsspec.AbstractFileSystem, index_path: str) -> str:
    """Copy a remote index to a local file (DuckDB opens local files); removed at exit."""
    local = os.path.join(_scratch_dir(), f"{uuid.uuid4().hex[:8]}-{INDEX_NAME}")
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


# -- several runs side by side ----------------------------------------------------------------


def resolve_run_ids(con: duckdb.DuckDBPyConnection, refs: list[str]) -> list[str]:
    """Full run ids from ids or unique prefixes of them (``20260301-1204``), in the given order."""
    ids = []
    for ref in refs:
        found = [
            r
            for (r,) in con.execute("SELECT run_id FROM runs WHERE starts_with(run_id, ?)", [ref]).fetchall()
        ]
        if len(found) != 1:
            problem = "no run" if not found else f"{len(found)} runs ({', '.join(sorted(found)[:5])})"
            raise QueryError(
                f"'{ref}' matches {problem} in the index; give a longer id, or run `vlforge index`"
            )
        ids.append(found[0])
    return ids


def compare_runs(root: str, run_ids: list[str]) -> str:
    """``vlforge compare``: the runs' status, the recipe keys where they differ, final metrics and evals."""
    con = connect(root)
    try:
        ids = resolve_run_ids(con, run_ids)
        summary = con.execute(
            """SELECT run_id, recipe_name, status, last_step, start_time, left(git_commit, 10) AS git_commit
            FROM runs WHERE list_contains($ids, run_id) ORDER BY list_position($ids, run_id)""",
            {"ids": ids},
        ).fetchall()
        differ = _pivot(
            con,
            """SELECT key, run_id, value FROM configs WHERE list_contains($ids, run_id) AND key IN (
                SELECT key FROM configs WHERE list_contains($ids, run_id) GROUP BY key
                HAVING count(DISTINCT value) > 1 OR count(*) < len($ids))""",
            ids,
        )
        finals = _pivot(
            con,
            """SELECT name, run_id, value FROM metrics_last WHERE list_contains($ids, run_id)
            UNION ALL
            SELECT concat_ws('/', evaluator, nullif(dataset, ''), metric), run_id, arg_max(value, step)
            FROM evals WHERE list_contains($ids, run_id) GROUP BY ALL""",
            ids,
        )
    finally:
        con.close()
    columns = ["run_id", "recipe_name", "status", "last_step", "start_time", "git_commit"]
    return "\n\n".join(
        [
            format_table(columns, summary),
            format_table(["config (differing keys)", *ids], differ) if differ else "configs: identical",
            format_table(["final metric", *ids], finals),
        ]
    )


def _pivot(con: duckdb.DuckDBPyConnection, sql: str, ids: list[str]) -> list[tuple]:
    """(row key, run id, value) triples to one row per key with a column per run, keys sorted."""
    table: dict[str, dict[str, Any]] = {}
    for key, run_id, value in con.execute(sql, {"ids": ids}).fetchall():
        table.setdefault(key, {})[run_id] = value
    return [(key, *(table[key].get(i) for i in ids)) for key in sorted(table)]


def write_parquet(
    root: str, sql: str, out: str, *, timeout: float = DEFAULT_TIMEOUT_S, memory_limit: str | None = None
) -> int:
    """``vlforge query --format parquet -o FILE``: the result of ``sql`` to a Parquet file; returns rows.

    Streamed a batch at a time: a result of any size is written without being held in memory.
    """
    import pyarrow.parquet as pq

    def write(rel: duckdb.DuckDBPyRelation | None) -> int:
        if rel is None:
            raise QueryError("the query returns no result to write")
        reader = rel.to_arrow_reader()
        rows = 0
        with fsspec.open(out, "wb") as f, pq.ParquetWriter(f, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
        return rows

    return _run(root, sql, write, timeout, memory_limit)


def plot_metric(
    root: str,
    metric: str,
    out_png: str,
    *,
    run_ids: list[str] | None = None,
    where: str | None = None,
    recipe: str | None = None,
    label: str | None = None,
    smoothing: float = 0.0,
) -> int:
    """``vlforge plot``: curves of ``metric`` on one figure, written to ``out_png``.

    ``metric`` is a train metric (``train/loss``) or an eval one, named as ``vlforge compare``
    shows it (``retrieval/i2t_r1``, ``zeroshot/imagenet/top1``; an ``eval/`` prefix is allowed).
    The runs: those given, and/or those matching ``where``, and/or all runs of ``recipe``; with
    none of these, the latest run (by start time) that logged ``metric``. ``label`` names a
    recipe key (``optim.lr``) whose value labels each curve instead of the run id.
    ``smoothing`` in [0, 1) is the weight of an exponential moving average (as TensorBoard's
    slider). Returns the number of lines drawn.
    """
    if not 0.0 <= smoothing < 1.0:
        raise QueryError(f"smoothing must be in [0, 1), not {smoothing}")
    con = connect(root)
    try:
        ids = resolve_run_ids(con, run_ids) if run_ids else None
        curves = _curves(con, metric, ids, where, recipe)
        if not curves:
            names = [n for (n,) in con.execute(f"{_CURVE_NAMES} ORDER BY name").fetchall()]
            raise QueryError(f"no run selected has logged '{metric}' (metrics: {', '.join(names) or 'none'})")
        if not (ids or where or recipe):
            curves = dict([max(curves.items(), key=lambda item: item[1][2])])  # the latest run
        labels = _labels(con, list(curves), label)
    finally:
        con.close()
    _draw(
        {labels[run]: (steps, values) for run, (steps, values, _) in curves.items()},
        metric,
        out_png,
        smoothing,
    )
    return len(curves)


# Train and eval rows under one name each: eval metrics as `vlforge compare` names them.
_CURVE_ROWS = """SELECT run_id, name, step, value FROM metrics
    UNION ALL SELECT run_id, concat_ws('/', evaluator, nullif(dataset, ''), metric), step, value FROM evals"""
_CURVE_NAMES = f"SELECT DISTINCT name FROM ({_CURVE_ROWS})"


def _curves(
    con: duckdb.DuckDBPyConnection,
    metric: str,
    ids: list[str] | None,
    where: str | None,
    recipe: str | None,
) -> dict[str, tuple[list[int], list[float], Any]]:
    """run id -> (steps, values, run start time) of the selected runs that logged ``metric``."""
    name = metric.removeprefix("eval/") if metric.startswith("eval/") else metric
    sql = (
        f"SELECT c.run_id, list(step ORDER BY step), list(value ORDER BY step), any_value(r.start_time) "
        f"FROM ({_CURVE_ROWS}) c JOIN runs r USING (run_id) WHERE c.name IN ($metric, $name)"
        + (" AND list_contains($ids, c.run_id)" if ids else "")
        + (" AND r.recipe_name = $recipe" if recipe else "")
        + (f" AND c.run_id IN (SELECT run_id FROM runs WHERE {where})" if where else "")
        + " GROUP BY c.run_id ORDER BY c.run_id"
    )
    _refuse_writes(con, sql)
    params: dict[str, Any] = {"metric": metric, "name": name}
    params |= ({"ids": ids} if ids else {}) | ({"recipe": recipe} if recipe else {})
    return {run: (steps, values, start) for run, steps, values, start in con.execute(sql, params).fetchall()}


def _labels(con: duckdb.DuckDBPyConnection, run_ids: list[str], key: str | None) -> dict[str, str]:
    """The legend of each run: ``key=value`` (with the run id where values repeat), or the run id."""
    if not key:
        return {run: run for run in run_ids}
    values = dict(
        con.execute(
            "SELECT run_id, value FROM configs WHERE key = $key AND list_contains($ids, run_id)",
            {"key": key, "ids": run_ids},
        ).fetchall()
    )
    if not values:
        known = [k for (k,) in con.execute("SELECT DISTINCT key FROM configs ORDER BY key").fetchall()]
        raise QueryError(f"no plotted run has the recipe key '{key}'{_did_you_mean(key, known)}")
    labels = {run: f"{key}={values.get(run, '(unset)')}" for run in run_ids}
    repeated = {text for text in labels.values() if list(labels.values()).count(text) > 1}
    return {run: f"{text} ({run})" if text in repeated else text for run, text in labels.items()}


def _did_you_mean(word: str, choices: list[str]) -> str:
    from vlforge.registry import did_you_mean

    return did_you_mean(word, choices)


def _draw(
    curves: dict[str, tuple[list[int], list[float]]], metric: str, out_png: str, smoothing: float
) -> None:
    """One line per entry of ``curves`` (legend label -> steps, values)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for label, (steps, values) in curves.items():
        ax.plot(steps, ema(values, smoothing), label=label, linewidth=1.2)
    ax.set(xlabel="step", ylabel=metric, title=metric + (f" (EMA {smoothing:g})" if smoothing else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    with fsspec.open(out_png, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    plt.close(fig)


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average: the first points are not pulled towards zero."""
    if not weight:
        return values
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out
