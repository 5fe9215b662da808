"""Run directories, the DuckDB index and read-only queries (vlforge.results)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import duckdb
import fsspec
import pytest

from vlforge.errors import UserError
from vlforge.results import (
    IndexLockedError,
    QueryError,
    RunWriter,
    build_index,
    compare_runs,
    connect,
    list_runs,
    plot_metric,
    query,
    resolve_root,
    write_parquet,
)
from vlforge.results.index import _overlapping, flatten_config, index_lock

CONFIG = {"optim": {"lr": 3e-4}, "masking": {"type": "flip.random", "ratio": 0.5}, "tags": ["a", "b"]}


def make_run(root, experiment="exp", steps=range(5), names=("loss", "acc"), config=CONFIG, **kw) -> RunWriter:
    """A completed run whose metric ``name`` at ``step`` is ``step + len(name) / 10``."""
    run = RunWriter.create(
        str(root), experiment, recipe_name="tiny", recipe_toml="x = 1\n", config=config, **kw
    )
    for step in steps:
        run.log_metrics(step, {n: step + len(n) / 10 for n in names})
    run.close()
    return run


def rows(root, sql: str) -> list[tuple]:
    con = connect(str(root))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# -- run directory ----------------------------------------------------------------------------


def test_run_directory_layout(tmp_path: Path) -> None:
    run = RunWriter.create(
        str(tmp_path), "exp", recipe_name="tiny", recipe_toml="x = 1\n", config=CONFIG, flush_every=4
    )
    assert run.run_dir == str(tmp_path / "exp" / run.run_id)
    for step in range(10):
        run.log_metrics(step, {"loss": 1.0 / (step + 1)})
    run.log_eval(9, "zeroshot", {"top1": 0.25}, dataset="imagenet")
    run.close()

    d = Path(run.run_dir)
    assert (d / "recipe.toml").read_text() == "x = 1\n"
    assert json.loads((d / "config.json").read_text()) == CONFIG
    env = json.loads((d / "env.json").read_text())
    assert {"git", "python", "packages", "hosts", "slurm", "command", "world_size"} <= env.keys()
    assert "torch" in env["packages"] and env["packages"]["duckdb"] == duckdb.__version__
    status = json.loads((d / "status.json").read_text())
    assert status["status"] == "completed" and status["last_step"] == 9 and status["end_time"]
    assert status["run_id"] == run.run_id and len(status["attempts"]) == 1

    chunks = sorted(p.name for p in (d / "metrics").iterdir())
    assert len(chunks) == 3  # 4 + 4 rows by size, the last 2 at close
    assert [c[:12] for c in chunks] == ["000000000000", "000000000004", "000000000008"]
    lines = [json.loads(x) for c in chunks for x in (d / "metrics" / c).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(10))
    assert set(lines[0]) == {"step", "name", "value", "time"}
    assert len(list((d / "evals").iterdir())) == 1
    assert not list(d.rglob("*.tmp"))


def test_a_chunk_holds_each_key_once_and_names_its_steps(tmp_path: Path) -> None:
    run = RunWriter.create(str(tmp_path), "exp", recipe_name="t", recipe_toml="", config={})
    run.log_metrics(7, {"loss": 1.0})
    run.log_metrics(3, {"loss": 2.0})
    run.log_metrics(7, {"loss": 3.0})  # logged again before the flush: the last one counts
    run.close()
    (chunk,) = (Path(run.run_dir) / "metrics").iterdir()
    assert re.fullmatch(r"000000000003-000000000007-[0-9a-f]{8}\.jsonl", chunk.name)
    assert [(r["step"], r["value"]) for r in map(json.loads, chunk.read_text().splitlines())] == [
        (7, 3.0),
        (3, 2.0),
    ]


def test_only_overlapping_chunks_are_deduplicated() -> None:
    def chunk(run: str, first: int | None, last: int | None) -> dict:
        return {"path": f"{run}/{first}-{last}", "run_id": run, "first_step": first, "last_step": last}

    known = [chunk("a", 0, 99), chunk("b", 0, 9)]
    new = [
        chunk("a", 100, 199),
        chunk("a", 150, 160),
        chunk("b", 10, 19),
        chunk("c", 0, 5),
        chunk("d", None, None),
    ]
    assert _overlapping(new, known) == {"a/100-199", "a/150-160", "d/None-None"}
    assert _overlapping([chunk("b", 5, 12)], known) == {"b/5-12"}


def test_status_is_replaced_atomically(tmp_path: Path) -> None:
    """A reader polling status.json while the writer rewrites it always parses a whole file."""
    run = make_run(tmp_path)
    path = Path(run.run_dir) / "status.json"
    run.heartbeat(123)  # within heartbeat_every of the last write: skipped
    assert json.loads(path.read_text())["last_step"] == 4
    run.heartbeat_every = 0
    stop, seen = threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            seen.append(json.loads(path.read_text())["run_id"])

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(300):
        run.heartbeat(step)
    stop.set()
    reader.join()
    assert seen and set(seen) == {run.run_id}


def test_resume_keeps_id_and_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "111")
    first = RunWriter.create(str(tmp_path), "exp", recipe_name="t", recipe_toml="", config={})
    first.log_metrics(0, {"loss": 1.0})
    first.close("preempted", "SIGUSR1")
    monkeypatch.setenv("SLURM_JOB_ID", "222")
    again = RunWriter.open(first.run_dir)
    assert again.run_id == first.run_id and again.run_dir == first.run_dir
    again.log_metrics(1, {"loss": 0.5})
    again.close()
    status = again.status
    assert status["slurm_job_ids"] == ["111", "222"]
    assert [a.get("status") for a in status["attempts"]] == ["preempted", "completed"]
    assert len(list((Path(first.run_dir) / "metrics").iterdir())) == 2


def test_context_manager_records_failure(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError),
        RunWriter.create(str(tmp_path), "exp", recipe_name="t", recipe_toml="", config={}) as run,
    ):
        run.log_metrics(0, {"loss": 1.0})
        raise ValueError("loss is nan")
    assert run.status["status"] == "failed" and run.status["reason"] == "ValueError: loss is nan"


KILLED_WRITER = """
import os, sys
from vlforge.results import RunWriter
run = RunWriter.create(sys.argv[1], "exp", recipe_name="t", recipe_toml="", config={}, flush_every=1000)
for step in range(10):
    run.log_metrics(step, {"loss": float(step)})
run.flush()
run.log_metrics(10, {"loss": 10.0})  # buffered, never flushed
os._exit(1)
"""


def test_killed_writer_leaves_flushed_rows_and_shows_stale(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], capture_output=True)
    assert proc.returncode == 1, proc.stderr.decode()

    build_index(str(tmp_path))  # heartbeat is fresh: still looks alive
    assert rows(tmp_path, "SELECT status, last_step FROM runs") == [("running", 9)]
    build_index(str(tmp_path), stale_after=0)
    assert rows(tmp_path, "SELECT status FROM runs") == [("stale",)]
    assert rows(tmp_path, "SELECT count(*), max(step) FROM metrics") == [(10, 9)]


# -- index ------------------------------------------------------------------------------------

EXPECTED_COLUMNS = {
    "runs": {
        "run_id": "VARCHAR",
        "experiment": "VARCHAR",
        "recipe_name": "VARCHAR",
        "status": "VARCHAR",
        "reason": "VARCHAR",
        "start_time": "TIMESTAMP",
        "end_time": "TIMESTAMP",
        "last_step": "BIGINT",
        "heartbeat": "TIMESTAMP",
        "slurm_job_id": "VARCHAR",
        "slurm_job_ids": "VARCHAR[]",
        "git_commit": "VARCHAR",
        "git_dirty": "BOOLEAN",
        "hosts": "VARCHAR[]",
        "world_size": "INTEGER",
        "parent_run_id": "VARCHAR",
        "attempts": "INTEGER",
        "run_dir": "VARCHAR",
        "config": "JSON",
    },
    "metrics": {
        "run_id": "VARCHAR",
        "step": "BIGINT",
        "name": "VARCHAR",
        "value": "DOUBLE",
        "time": "TIMESTAMP",
    },
    "metrics_last": {
        "run_id": "VARCHAR",
        "name": "VARCHAR",
        "step": "BIGINT",
        "value": "DOUBLE",
        "time": "TIMESTAMP",
    },
    "evals": {
        "run_id": "VARCHAR",
        "step": "BIGINT",
        "evaluator": "VARCHAR",
        "dataset": "VARCHAR",
        "metric": "VARCHAR",
        "value": "DOUBLE",
        "time": "TIMESTAMP",
    },
    "configs": {
        "run_id": "VARCHAR",
        "key": "VARCHAR",
        "value": "VARCHAR",
        "value_num": "DOUBLE",
        "value_type": "VARCHAR",
        "value_json": "VARCHAR",
    },
    "artifacts": {
        "run_id": "VARCHAR",
        "kind": "VARCHAR",
        "path": "VARCHAR",
        "step": "BIGINT",
        "size_bytes": "BIGINT",
    },
}


def test_index_schema_and_rows(tmp_path: Path) -> None:
    a = make_run(tmp_path, steps=range(3), world_size=8, hosts=["n1", "n2"])
    b = make_run(tmp_path, "other", steps=range(2), config={"optim": {"lr": 1e-3}}, parent_run_id=a.run_id)
    ckpt = Path(b.run_dir) / "checkpoints"
    ckpt.mkdir()
    (ckpt / "step_00000100.pt").write_bytes(b"x" * 123)
    with RunWriter.open(a.run_dir) as again:
        again.log_eval(3, "retrieval", {"r@1": 0.5, "r@5": 0.75}, dataset="coco")
    build_index(str(tmp_path))

    for table, columns in EXPECTED_COLUMNS.items():
        described = dict(rows(tmp_path, f"SELECT column_name, column_type FROM (DESCRIBE {table})"))
        assert described == columns, table

    runs = "SELECT run_id, experiment, status, world_size, hosts, parent_run_id FROM runs ORDER BY start_time"
    assert rows(tmp_path, runs) == [
        (a.run_id, "exp", "completed", 8, [socket.gethostname()], None),  # hosts of the latest attempt
        (b.run_id, "other", "completed", 1, [socket.gethostname()], a.run_id),
    ]
    assert rows(tmp_path, f"SELECT step, name, value FROM metrics WHERE run_id = '{a.run_id}'") == [
        (0, "acc", 0.3),
        (1, "acc", 1.3),
        (2, "acc", 2.3),
        (0, "loss", 0.4),
        (1, "loss", 1.4),
        (2, "loss", 2.4),
    ]
    assert rows(tmp_path, "SELECT run_id, step, evaluator, dataset, metric, value FROM evals") == [
        (a.run_id, 3, "retrieval", "coco", "r@1", 0.5),
        (a.run_id, 3, "retrieval", "coco", "r@5", 0.75),
    ]
    assert rows(tmp_path, f"SELECT name, step, value FROM metrics_last WHERE run_id = '{b.run_id}'") == [
        ("acc", 1, 1.3),
        ("loss", 1, 1.4),
    ]
    assert rows(tmp_path, "SELECT run_id, kind, step, size_bytes FROM artifacts") == [
        (b.run_id, "checkpoint", 100, 123)
    ]
    assert rows(tmp_path, "SELECT run_id FROM runs WHERE config->>'$.masking.ratio' = '0.5'") == [(a.run_id,)]
    assert rows(tmp_path, "SELECT run_id FROM configs WHERE key = 'optim.lr' AND value_num = 1e-3") == [
        (b.run_id,)
    ]
    assert rows(tmp_path, f"SELECT attempts, slurm_job_ids FROM runs WHERE run_id = '{a.run_id}'") == [
        (2, [])
    ]


def test_flatten_config_types() -> None:
    leaves = {r["key"]: (r["value"], r["value_num"], r["value_type"]) for r in flatten_config(CONFIG)}
    assert leaves == {
        "optim.lr": ("0.0003", 3e-4, "float"),
        "masking.type": ("flip.random", None, "str"),
        "masking.ratio": ("0.5", 0.5, "float"),
        "tags": ('["a", "b"]', None, "list"),
    }


def table_contents(root) -> dict[str, list[tuple]]:
    out = {}
    for table in ("runs", "metrics", "evals", "configs", "artifacts", "metrics_last"):
        cols = "* EXCLUDE (heartbeat)" if table == "runs" else "*"
        out[table] = sorted(rows(root, f"SELECT {cols} FROM {table}"), key=repr)
    return out


def test_reindex_is_idempotent_and_incremental_equals_rebuild(tmp_path: Path) -> None:
    first = make_run(tmp_path)
    build_index(str(tmp_path))
    once = table_contents(tmp_path)
    build_index(str(tmp_path))
    assert table_contents(tmp_path) == once

    second = make_run(tmp_path, steps=range(7))
    with RunWriter.open(first.run_dir) as again:  # a requeued run logging again
        again.log_metrics(5, {"loss": 5.0})
    build_index(str(tmp_path))
    incremental = table_contents(tmp_path)
    assert len(incremental["metrics"]) == 10 + 1 + 14
    assert rows(tmp_path, "SELECT count(*) FROM ingested_files") == [(3,)]  # one chunk each
    build_index(str(tmp_path), rebuild=True)
    assert table_contents(tmp_path) == incremental
    assert second.run_id in {r[0] for r in incremental["runs"]}


def test_duplicate_rows_keep_the_latest(tmp_path: Path) -> None:
    run = make_run(tmp_path, steps=range(10), names=("loss",))
    build_index(str(tmp_path))  # the first values are indexed, then replaced incrementally
    with RunWriter.open(run.run_dir) as again:
        for step in range(5, 10):
            again.log_metrics(step, {"loss": -step})
    for rebuild in (False, True):
        build_index(str(tmp_path), rebuild=rebuild)
        got = rows(tmp_path, "SELECT step, value FROM metrics ORDER BY step")
        assert got == [(s, s + 0.4) for s in range(5)] + [(s, -s) for s in range(5, 10)]


def test_removed_run_leaves_the_index(tmp_path: Path) -> None:
    keep, gone = make_run(tmp_path), make_run(tmp_path)
    build_index(str(tmp_path))
    fsspec.filesystem("file").rm(gone.run_dir, recursive=True)
    build_index(str(tmp_path))
    assert rows(tmp_path, "SELECT DISTINCT run_id FROM metrics") == [(keep.run_id,)]


def test_index_lock_waits_then_explains(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    lock = str(tmp_path / "index.duckdb.lock")
    held = pytest.raises(IndexLockedError, match=f"pid {os.getpid()}.*delete the lock file")
    with index_lock(fs, lock, timeout=1), held:
        build_index(str(tmp_path), lock_timeout=0.3)
    assert not os.path.exists(lock)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    Path(lock).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "x"}))
    build_index(str(tmp_path), lock_timeout=0.3)  # a dead holder's lock is taken over


# -- queries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO runs (run_id) VALUES ('x')",
        "UPDATE metrics SET value = 0",
        "DELETE FROM metrics",
        "CREATE TABLE t AS SELECT 1",
        "DROP TABLE runs",
        "ATTACH 'other.duckdb' AS o",
        "COPY runs TO 'runs.csv'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SELECT 1; DROP TABLE runs",
    ],
)
def test_queries_are_read_only(tmp_path: Path, sql: str) -> None:
    make_run(tmp_path)
    with pytest.raises(QueryError, match="^the index is read-only: "):
        query(str(tmp_path), sql)
    assert rows(tmp_path, "SELECT count(*) FROM metrics") == [(10,)]


def test_connection_is_read_only(tmp_path: Path) -> None:
    make_run(tmp_path)
    con = connect(str(tmp_path))
    for sql in ("INSERT INTO metrics SELECT * FROM metrics", "SELECT * FROM read_csv('/etc/hostname')"):
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    con.close()


def test_formats(tmp_path: Path) -> None:
    run = make_run(tmp_path, steps=[0, 1])
    sql = "SELECT name, step, value FROM metrics WHERE name = 'loss' ORDER BY step"
    assert query(str(tmp_path), sql).splitlines() == [
        "name  step  value",
        "----  ----  -----",
        "loss     0    0.4",
        "loss     1    1.4",
        "(2 rows)",
    ]
    assert query(str(tmp_path), sql, "csv") == "name,step,value\nloss,0,0.4\nloss,1,1.4\n"
    assert json.loads(query(str(tmp_path), sql, "json"))[1] == {"name": "loss", "step": 1, "value": 1.4}
    listing = list_runs(str(tmp_path), "status = 'completed'")
    assert run.run_id in listing and "(1 row)" in listing
    assert "(0 rows)" in list_runs(str(tmp_path), "status = 'failed'")
    with pytest.raises(QueryError, match="no_such_table"):
        query(str(tmp_path), "SELECT * FROM no_such_table")


def test_memory_root_end_to_end() -> None:
    root = f"memory://vlforge-test-{uuid.uuid4().hex[:8]}"
    try:
        run = make_run(root, steps=range(4))
        assert run.run_dir.startswith("memory://")
        index = build_index(root)
        assert index.startswith("memory://") and fsspec.filesystem("memory").exists(index)
        assert query(root, "SELECT count(*) AS n FROM metrics", "csv") == "n\n8\n"
        make_run(root, steps=range(2))
        build_index(root)
        assert rows(root, "SELECT count(*), count(DISTINCT run_id) FROM metrics") == [(12, 2)]
        with pytest.raises(QueryError, match="read-only"):
            query(root, "DELETE FROM metrics")
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no runs root at"):
        list_runs(str(tmp_path / "nowhere"))


def test_resolve_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLFORGE_RUNS", raising=False)
    assert resolve_root(None) == str(tmp_path / "runs")
    monkeypatch.setenv("VLFORGE_RUNS", "s3://bucket/runs")
    assert resolve_root(None) == "s3://bucket/runs"
    assert resolve_root("memory://x") == "memory://x"


# -- the documented queries -------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def make_corpus(root: str) -> None:
    """Runs of a small sweep (lr × masking ratio × seed) plus a failed, a dead and a resumed run."""
    for i, (lr, ratio, seed) in enumerate(
        (lr, r, s) for lr in (3e-4, 1e-3) for r in (0.5, 0.75) for s in (0, 1)
    ):
        config = {
            "optim": {"lr": lr},
            "masking": {"ratio": ratio},
            "teacher": {"momentum": 0.995},
            "seed": seed,
        }
        run = RunWriter.create(
            root, "sweep", recipe_name="flip", recipe_toml="", config=config, world_size=2**i
        )
        for step in range(0, 301, 50):
            loss = 3.0 / (1 + step * lr * 100) + ratio / 2 + seed / 10
            run.log_metrics(step, {"train/loss": loss, "train/samples_per_s": 100.0 * 2**i})
        run.log_eval(300, "zeroshot", {"top1": 1 - ratio / 2 + seed / 100}, dataset="imagenet")
        Path(run.run_dir, "checkpoints").mkdir()
        Path(run.run_dir, "checkpoints", "step_00000300.pt").write_bytes(b"0" * 1000)
        run.close()
    failed = RunWriter.create(
        root, "sweep", recipe_name="flip", recipe_toml="", config={"optim": {"lr": 1.0}}
    )
    failed.log_metrics(0, {"train/loss": float("nan")})
    failed.close("failed", "non-finite loss at step 0")
    dead = RunWriter.create(root, "sweep", recipe_name="flip", recipe_toml="", config={"optim": {"lr": 3e-4}})
    dead.log_metrics(0, {"train/loss": 3.0})
    dead.flush()  # and never closed
    tuned = RunWriter.create(
        root, "tune", recipe_name="flip_unmasked", recipe_toml="", config={}, parent_run_id=run.run_id
    )
    tuned.log_metrics(0, {"train/loss": 1.5})
    tuned.close("preempted", "SIGUSR1")
    RunWriter.open(tuned.run_dir).close()


def test_documented_queries_run_and_answer(tmp_path: Path) -> None:
    make_corpus(str(tmp_path))
    build_index(str(tmp_path), stale_after=0)
    queries = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(queries) >= 10
    con = connect(str(tmp_path))
    for sql in queries:
        assert con.sql(sql).fetchall(), f"no rows from:\n{sql}"
    con.close()
    assert rows(tmp_path, "SELECT status, count(*) FROM runs GROUP BY ALL ORDER BY ALL") == [
        ("completed", 9),
        ("failed", 1),
        ("stale", 1),
    ]


def test_compare_and_plot(tmp_path: Path) -> None:
    make_corpus(str(tmp_path))
    build_index(str(tmp_path))
    ids = [r for (r,) in rows(tmp_path, "SELECT run_id FROM runs WHERE experiment = 'sweep' ORDER BY run_id")]
    text = compare_runs(str(tmp_path), [ids[0], ids[1][:-1]])  # a unique prefix is enough
    assert "config (differing keys)" in text and "train/loss" in text and "zeroshot/imagenet/top1" in text
    with pytest.raises(QueryError, match="matches 11 runs"):
        compare_runs(str(tmp_path), ["2"])

    png = tmp_path / "curves.png"
    assert (
        plot_metric(str(tmp_path), "train/loss", str(png), where="experiment = 'sweep'", smoothing=0.6) == 10
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metric(str(tmp_path), "train/loss", str(png), run_ids=ids[:3]) == 3
    assert (
        plot_metric(str(tmp_path), "train/loss", str(png), run_ids=ids[:3], where=f"run_id <> '{ids[0]}'")
        == 2
    )
    with pytest.raises(QueryError, match="metrics: train/loss, train/samples_per_s"):
        plot_metric(str(tmp_path), "train/los", str(png))
    with pytest.raises(QueryError):
        plot_metric(str(tmp_path), "train/loss", str(png), where="true; DROP TABLE runs")

    out = tmp_path / "final.parquet"
    assert write_parquet(str(tmp_path), "SELECT * FROM metrics_last", str(out)) == 8 * 2 + 3
    assert len(duckdb.sql(f"SELECT * FROM '{out}'").fetchall()) == 19


# -- many writers, one indexer ----------------------------------------------------------------

WRITERS = """
import os, sys, time
from vlforge.results import RunWriter
root, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
children = []
for i in range(n):  # forked after the imports: 32 real processes without 32 interpreter starts
    pid = os.fork()
    if pid == 0:
        run = RunWriter.create(root, "swarm", f"w{i:02d}", recipe_name="t", recipe_toml="", config={"i": i},
                               flush_every=20)
        for step in range(steps):
            run.log_metrics(step, {"a": i + step, "b": -step, "c": 0.5})
            time.sleep(0.01)
        run.close()
        os._exit(0)
    children.append(pid)
sys.exit(max(os.waitpid(pid, 0)[1] for pid in children))
"""


def test_32_writers_while_indexing(tmp_path: Path) -> None:
    root, steps = str(tmp_path), 100
    writers = subprocess.Popen([sys.executable, "-c", WRITERS, root, "32", str(steps)])
    passes = 0
    while writers.poll() is None or passes < 2:
        build_index(root)  # mid-write: the index holds whole chunks only
        passes += 1
        assert rows(
            tmp_path, "SELECT count(*) FROM (SELECT DISTINCT run_id, step, name FROM metrics)"
        ) == rows(tmp_path, "SELECT count(*) FROM metrics")
    assert writers.returncode == 0 and passes >= 3, passes
    build_index(root)
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT run_id) FROM metrics") == [(32 * steps * 3, 32)]
    assert rows(
        tmp_path, "SELECT count(*) FROM metrics WHERE name = 'a' AND value <> step + run_id[2:]::INT"
    ) == [(0,)]
    assert rows(tmp_path, "SELECT DISTINCT status FROM runs") == [("completed",)]
    incremental = table_contents(tmp_path)
    build_index(root, rebuild=True)
    assert table_contents(tmp_path) == incremental


def test_a_held_connection_keeps_its_snapshot_and_a_new_one_sees_the_new_index(tmp_path: Path) -> None:
    make_run(tmp_path)
    held = connect(str(tmp_path))
    make_run(tmp_path)
    build_index(str(tmp_path))
    assert query(str(tmp_path), "SELECT count(*) AS n FROM runs", "csv") == "n\n2\n"
    assert held.execute("SELECT count(*) FROM runs").fetchall() == [(1,)]
    held.close()
