"""Faults and hostile input on the results side (issue 17): each one fails clearly and loses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import fsspec
import pytest

from vlforge import checkpoint as ckpt
from vlforge.cli import main
from vlforge.errors import UserError
from vlforge.launch.local import launch_local
from vlforge.launch.worker import RunJob
from vlforge.results import QueryError, RunWriter, build_index, connect, query
from vlforge.results import queries as queries_module
from vlforge.results.diskfull import DiskFullError
from vlforge.results.locks import FileLock, LockHeldError
from vlforge.results.rundir import RUN_LOCK, RunLockedError

from .test_engine import losses
from .test_results import make_run, rows, table_contents

CROSS_JOIN = "SELECT count(*) FROM range(100000000000) a, range(100000000000) b WHERE a.range + b.range < 0"


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlforge.cli", *args], capture_output=True, text=True, timeout=300, **kw
    )


def metric_steps(root: Path) -> list[int]:
    """Steps of train/loss in the run directories' chunk files (every row, duplicates included)."""
    steps = []
    for chunk in root.glob("*/*/metrics/*.jsonl"):
        for line in chunk.read_text().splitlines():
            row = json.loads(line)
            if row["name"] == "train/loss":
                steps.append(row["step"])
    return sorted(steps)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (a real full disk); skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- connect() is read-only whatever the caller runs --------------------------------------------


def test_connect_cannot_reattach_the_index_writable(tmp_path: Path) -> None:
    make_run(tmp_path)
    build_index(str(tmp_path))
    before = table_contents(tmp_path)
    con = connect(str(tmp_path))
    attack = [
        "USE memory",
        "DETACH vlforge",
        f"ATTACH '{tmp_path}/index.duckdb' AS w",
        f"ATTACH '{tmp_path}/index.duckdb' AS w (READ_WRITE)",
        "DROP TABLE w.runs",
        "DROP TABLE runs",
        "DELETE FROM metrics",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "SET access_mode = 'READ_WRITE'",
        f"COPY runs TO '{tmp_path}/runs.csv'",
    ]
    for sql in attack:
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    con.execute("CREATE TEMP TABLE scratch AS SELECT run_id FROM runs")  # in memory: allowed
    assert con.execute("SELECT count(*) FROM scratch").fetchall() == [(1,)]
    con.close()
    assert table_contents(tmp_path) == before
    assert not (tmp_path / "runs.csv").exists()
    assert not list(tmp_path.glob("index.duckdb.*"))  # the connection's hard link is gone


def test_connect_has_a_memory_limit_that_leaves_the_machine_usable(tmp_path: Path) -> None:
    make_run(tmp_path)
    con = connect(str(tmp_path))
    (limit,) = con.execute("SELECT current_setting('memory_limit')").fetchone()
    con.close()
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    value, unit = limit.split()
    gib = float(value) * {"MiB": 1 / 1024, "GiB": 1.0}[unit]
    assert gib <= total_gib / 4 + 0.01, (limit, total_gib)
    with pytest.raises(QueryError, match="more memory than its limit.*--memory-limit"):
        query(str(tmp_path), "SELECT length(list(range)) FROM range(200000000)", memory_limit="64MB")
    with pytest.raises(QueryError, match="bad memory limit 'lots'"):
        query(str(tmp_path), "SELECT 1", memory_limit="lots")


def test_a_huge_text_result_is_refused_not_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path)
    monkeypatch.setattr(queries_module, "MAX_ROWS", 10)
    assert query(str(tmp_path), "SELECT * FROM range(10)", "csv").count("\n") == 11
    with pytest.raises(QueryError, match="more than 10 rows.*--format parquet"):
        query(str(tmp_path), "SELECT * FROM range(11)")
    out = tmp_path / "all.parquet"
    assert queries_module.write_parquet(str(tmp_path), "SELECT * FROM range(100000)", str(out)) == 100000


# -- time limit and Ctrl-C --------------------------------------------------------------------


def test_query_time_limit_python_and_cli(tmp_path: Path) -> None:
    make_run(tmp_path)
    build_index(str(tmp_path))
    start = time.monotonic()
    with pytest.raises(QueryError, match="time limit of 0.5 s.*--timeout"):
        query(str(tmp_path), "SELECT sum(hash(range)) FROM range(1000000000000)", timeout=0.5)
    assert time.monotonic() - start < 3.0
    result = cli("query", CROSS_JOIN, "--runs-root", str(tmp_path), "--timeout", "1")
    assert result.returncode == 2, result.stderr
    assert "time limit of 1 s" in result.stderr and "Traceback" not in result.stderr


def _wait_for_open_index(pid: int, deadline_s: float = 60.0) -> None:
    """Until process ``pid`` has the index open (its query is about to run)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            if any(
                "index.duckdb" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
            ):
                return
        time.sleep(0.05)
    raise AssertionError("the query process never opened the index")


def test_ctrl_c_stops_a_query_within_a_second(tmp_path: Path) -> None:
    make_run(tmp_path)
    build_index(str(tmp_path))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlforge.cli",
            "query",
            CROSS_JOIN,
            "--runs-root",
            str(tmp_path),
            "--timeout",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_open_index(proc.pid)
    time.sleep(1.0)  # well inside the query
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    message = proc.stderr.readline()  # printed once DuckDB has stopped the query
    took = time.monotonic() - sent
    stderr = message + proc.communicate(timeout=30)[1]
    assert proc.returncode == 130, stderr
    assert "query interrupted (Ctrl-C)" in message and "Traceback" not in stderr
    assert took < 1.0, f"Ctrl-C took {took:.2f} s to stop the query"


# -- a damaged index ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [b"", os.urandom(4096) * 16])
def test_damaged_index_is_rebuilt_from_the_run_directories(tmp_path: Path, damage: bytes) -> None:
    for _ in range(2):
        make_run(tmp_path)
    build_index(str(tmp_path))
    healthy = table_contents(tmp_path)
    index = tmp_path / "index.duckdb"

    index.write_bytes(damage)
    with pytest.raises(QueryError, match=r"is damaged.*vlforge index --rebuild"):
        connect(str(tmp_path), build=False)
    assert index.read_bytes() == damage  # refusing changed nothing

    for command in (["runs"], ["query", "SELECT count(*) FROM metrics"]):
        index.write_bytes(damage)
        result = cli(*command, "--runs-root", str(tmp_path))
        assert result.returncode == 0, result.stderr
        assert "is damaged" in result.stderr and "rebuilding it from the run directories" in result.stderr
        assert "Traceback" not in result.stderr
        assert table_contents(tmp_path) == healthy

    index.write_bytes(damage)
    result = cli("index", str(tmp_path))
    assert result.returncode == 0 and "is damaged" in result.stderr and "Traceback" not in result.stderr
    assert table_contents(tmp_path) == healthy


def test_an_unchanged_root_is_not_reindexed_until_a_run_changes_or_turns_stale(tmp_path: Path) -> None:
    make_run(tmp_path)
    index = tmp_path / "index.duckdb"
    build_index(str(tmp_path))
    built = index.stat().st_ino  # every publication is a new file (os.replace)
    build_index(str(tmp_path))
    assert index.stat().st_ino == built  # nothing new: the index is neither copied nor rewritten

    make_run(tmp_path, steps=range(3))
    build_index(str(tmp_path))
    assert index.stat().st_ino != built
    assert rows(tmp_path, "SELECT count(*) FROM runs") == [(2,)]

    live = RunWriter.create(str(tmp_path), "exp", recipe_name="tiny", recipe_toml="", config={})
    live.log_metrics(0, {"loss": 1.0})
    live.flush()  # and no heartbeat after this
    build_index(str(tmp_path), stale_after=2)
    assert rows(tmp_path, f"SELECT status FROM runs WHERE run_id = '{live.run_id}'") == [("running",)]
    time.sleep(2.2)  # the run's files stay as they were; its heartbeat ages past stale_after
    build_index(str(tmp_path), stale_after=2)
    assert rows(tmp_path, f"SELECT status FROM runs WHERE run_id = '{live.run_id}'") == [("stale",)]


# -- locks --------------------------------------------------------------------------------------


def test_an_empty_lock_is_taken_over_at_once(tmp_path: Path) -> None:
    make_run(tmp_path)
    lock = tmp_path / "index.duckdb.lock"
    lock.write_bytes(b"")  # what a full disk used to leave
    old = time.time() - 60
    os.utime(lock, (old, old))
    start = time.monotonic()
    build_index(str(tmp_path), lock_timeout=60)
    assert time.monotonic() - start < 5.0 and not lock.exists()
    lock.write_bytes(b"")  # a fresh one: taken over after the short grace for writers
    start = time.monotonic()
    build_index(str(tmp_path), lock_timeout=60)
    assert time.monotonic() - start < 5.0 and not lock.exists()
    assert rows(tmp_path, "SELECT count(*) FROM runs") == [(1,)]


def test_a_lock_of_another_host_is_taken_over_when_its_heartbeat_is_stale(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "x.lock")
    beat = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    holder = {"pid": 1, "host": "elsewhere", "since": beat, "heartbeat": beat, "token": "t"}
    Path(path).write_text(json.dumps(holder))
    with pytest.raises(LockHeldError, match="pid 1 on elsewhere"):
        FileLock(fs, path, stale_after=600).acquire(timeout=0)
    mine = FileLock(fs, path, stale_after=10)
    mine.acquire(timeout=0)  # 30 s without a beat > 10 s
    assert mine.read() == mine.me
    mine.release()
    assert not Path(path).exists()


DEAD_WRITER = """
import sys, time
from vlforge.results import RunWriter
run = RunWriter.open(sys.argv[1])
print("holding", flush=True)
time.sleep(600)
"""


def test_two_resumes_of_one_run_the_second_is_refused(tmp_path: Path, tiny_recipe: Path) -> None:
    root = tmp_path / "runs"
    first = cli("run", str(tiny_recipe), "--runs-root", str(root), "train.steps=2")
    assert first.returncode == 0, first.stderr
    (run_dir,) = root.glob("tests/*")
    status_before = (run_dir / "status.json").read_bytes()

    holder = subprocess.Popen(
        [sys.executable, "-c", DEAD_WRITER, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        held_status = (run_dir / "status.json").read_bytes()
        second = cli("run", str(tiny_recipe), "--runs-root", str(root), "--resume", run_dir.name)
        assert second.returncode == 2, second.stderr
        assert f"run {run_dir.name} is already being trained (pid {holder.pid} on " in second.stderr
        assert str(run_dir / RUN_LOCK) in second.stderr and "Traceback" not in second.stderr
        assert (run_dir / "status.json").read_bytes() == held_status  # the refused attempt wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(held_status)["attempts"][:1] == json.loads(status_before)["attempts"]

    # The holder is dead now (killed: its lock is still there): taken over at once.
    assert (run_dir / RUN_LOCK).exists()
    RunWriter.open(str(run_dir)).close()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and len(status["attempts"]) == 3
    assert not (run_dir / RUN_LOCK).exists()


def test_a_second_resume_on_two_local_ranks_is_refused_by_its_rank_0(
    tmp_path: Path, tiny_recipe: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Two resumes started together both pass the CLI's early check; then the run lock that rank 0
    # takes when it opens the run refuses the later one, with the message one process gives.
    root = tmp_path / "runs"
    assert main(["run", str(tiny_recipe), "--runs-root", str(root), "train.steps=2"]) == 0
    (run_dir,) = root.glob("tests/*")
    holder = subprocess.Popen(
        [sys.executable, "-c", DEAD_WRITER, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        held = files_of(run_dir)
        capfd.readouterr()
        job = RunJob(f"{run_dir}/recipe.toml", (), str(root), "tests", run_dir.name, resume=True)
        with pytest.raises(UserError, match=f"run {run_dir.name}: rank 0 stopped on the error above"):
            launch_local(job, nproc=2)
        err = capfd.readouterr().err
        assert f"vlforge: error: run {run_dir.name} is already being trained (pid {holder.pid} on " in err
        assert str(run_dir / RUN_LOCK) in err and "Traceback" not in err
        assert files_of(run_dir) == held  # the refused attempt wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_run_writer_refuses_a_second_live_writer(tmp_path: Path) -> None:
    run = RunWriter.create(str(tmp_path), "exp", recipe_name="t", recipe_toml="", config={})
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        RunWriter.open(run.run_dir)
    run.close()
    RunWriter.open(run.run_dir).close()  # released at close


# -- a full disk --------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_disk_run_fails_naming_the_disk_and_keeps_what_was_written(
    tmp_path: Path, tiny_recipe: Path
) -> None:
    reference_root = tmp_path / "reference"
    every_2 = [str(tiny_recipe), "train.checkpoint_every=2"]
    assert main(["run", *every_2, "--runs-root", str(reference_root)]) == 0
    (reference,) = [d.name for d in reference_root.glob("tests/*")]
    # 2 MB hold one checkpoint (1.2 MB) of the tiny model and its optimizer: step 4's fills the disk.
    with tmpfs(tmp_path / "disk", "2m") as disk:
        result = cli("run", *every_2, "--runs-root", str(disk))
        assert result.returncode == 1, result.stderr
        (run_dir,) = disk.glob("tests/*")
        partial = run_dir / "checkpoints" / "step_00000004.tmp"
        assert f"no space left on the disk at {disk} (" in result.stderr
        assert f" writing {partial}; free space there, then continue with " in result.stderr
        assert f"--resume {run_dir.name}" in result.stderr and "Traceback" not in result.stderr
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "failed" and status["last_step"] == 4
        assert status["reason"].startswith(f"disk full: no space left on the disk at {disk}")
        assert not (run_dir / RUN_LOCK).exists() and not (disk / "index.duckdb.lock").exists()
        # Nothing logged is lost: every row up to the failed checkpoint's step was flushed before
        # it, and its partial files are gone (their space is what the status and index need).
        assert metric_steps(disk) == [1, 2, 3, 4]
        assert not partial.exists() and not list(disk.rglob("*.tmp"))
        assert ckpt.step_of(ckpt.resume_checkpoint(str(run_dir))) == 2  # the committed one is intact

        # Space freed: the run continues from step 2 to the uninterrupted result, each step once.
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert main(["run", *every_2, "--runs-root", str(disk), "--resume", run_dir.name]) == 0
        assert losses(disk, run_dir.name) == losses(reference_root, reference)  # bitwise, steps 1..6
        assert rows(disk, "SELECT count(*), count(DISTINCT step) FROM metrics WHERE name = 'train/loss'") == [
            (6, 6)
        ]


def test_full_disk_while_logging_and_indexing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "256k") as disk:
        run = RunWriter.create(str(disk), "exp", recipe_name="t", recipe_toml="", config={}, flush_every=50)
        with pytest.raises(OSError) as full:
            for step in range(1, 10**6):
                run.log_metrics(step, {"train/loss": 1.0, "x" * 200: 0.0})
        assert str(disk / "exp" / run.run_id) in str(full.value.filename)
        run.close("failed", "disk full")  # the status still gets written
        status = json.loads((Path(run.run_dir) / "status.json").read_text())
        assert status["status"] == "failed" and status["reason"] == "disk full"
        assert not list(disk.rglob("*.tmp"))  # no partial files hold the space

        with pytest.raises(DiskFullError, match=f"no space left on the disk at {disk}"):
            build_index(str(disk))
        assert not (disk / "index.duckdb.lock").exists() and not (disk / "index.duckdb").exists()
        result = cli("index", str(disk))
        assert result.returncode == 1 and "no space left on the disk" in result.stderr
        assert "Traceback" not in result.stderr

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        build_index(str(disk))
        steps = metric_steps(disk)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 50
        assert rows(disk, "SELECT count(*), max(step) FROM metrics WHERE name = 'train/loss'") == [
            (len(steps), len(steps))
        ]


def test_a_requeued_slurm_job_takes_over_its_earlier_attempts_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "run.lock")
    now = datetime.now(UTC).isoformat()
    earlier = {
        "pid": 1,
        "host": "node7",
        "since": now,
        "heartbeat": now,
        "token": "t",
        "slurm_job": ["42", "0"],
    }
    Path(path).write_text(json.dumps(earlier))
    monkeypatch.setenv("SLURM_JOB_ID", "43")  # another job: the fresh holder on node7 is alive
    with pytest.raises(LockHeldError):
        FileLock(fs, path, stale_after=600).acquire(timeout=0)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeue of job 42: its attempt 0 has ended
    requeued = FileLock(fs, path, stale_after=600)
    requeued.acquire(timeout=0)
    assert requeued.read()["slurm_job"] == ["42", "1"]


def test_a_dead_indexer_on_another_host_is_taken_over_and_a_live_one_beats(tmp_path: Path) -> None:
    make_run(tmp_path)
    lock = tmp_path / "index.duckdb.lock"
    beat = (datetime.now(UTC) - timedelta(seconds=120)).isoformat()
    lock.write_text(json.dumps({"pid": 1, "host": "login2", "since": beat, "heartbeat": beat, "token": "t"}))
    start = time.monotonic()
    build_index(str(tmp_path), lock_timeout=60)  # 120 s without a beat: that indexer is gone
    assert time.monotonic() - start < 10.0 and not lock.exists()
    assert rows(tmp_path, "SELECT count(*) FROM runs") == [(1,)]

    live = FileLock(fsspec.filesystem("file"), str(lock))
    live.acquire(timeout=0)
    first = live.read()["heartbeat"]
    with live.beating(every=0.05):
        time.sleep(0.5)
    assert live.read()["heartbeat"] > first
    live.release()
