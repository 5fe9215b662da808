"""End to end on a real Slurm cluster: the one slurm/dev/start.sh runs on this machine.

Without a cluster these tests skip, except under CI=true, where they fail: CI (.ci/run)
starts the cluster first, and a silent skip there would hide a broken launcher.

Slurm holds a requeued job for about two minutes (Reason=BeginTime) before it may start
again; the tests let it start at once (``scontrol update StartTime=now``), which changes
nothing else: the job is still requeued and gets a new allocation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from vlforge.checkpoint import list_checkpoints
from vlforge.cli import main
from vlforge.launch.slurm import Submission, read_submissions, slurm_states
from vlforge.results.queries import query

from .conftest import REPO, TINY_RECIPE

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# A test plugin: each rank proves it joined the process group (an all_reduce of rank + 1),
# the first allocation of a job is slowed down so that a signal finds it mid-run, and with
# KILL_AT_STEP the training process SIGKILLs itself once at that step (as the OOM killer would).
SLURM_TEST_PLUGIN = """
import json, os, signal, time
import torch
import torch.distributed as dist
from vlforge.hookspecs import hookimpl

@hookimpl
def vlforge_run_start(state):
    total = torch.tensor([state.rank + 1.0])
    if dist.is_initialized():
        dist.all_reduce(total)
    with open(os.path.join(state.run_dir, f"rank{state.rank}.json"), "w") as f:
        json.dump({"world_size": state.world_size, "rank_sum": total.item(),
                   "master": os.environ.get("MASTER_ADDR"), "port": os.environ.get("MASTER_PORT")}, f)

@hookimpl
def vlforge_after_optimizer_step(state):
    if not int(os.environ.get("SLURM_RESTART_COUNT") or 0):
        time.sleep(float(os.environ.get("FIRST_ALLOCATION_STEP_S", "0")))

@hookimpl
def vlforge_step_start(state):
    marker = os.path.join(state.run_dir, "killed")
    if state.step == int(os.environ.get("KILL_AT_STEP", "-1")) and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found"
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return out.stderr.strip()
    if not {"idle", "mix", "alloc"} & set(out.stdout.split()):
        return f"no node is up (states: {out.stdout.split()})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    message = f"no Slurm cluster ({problem}); start one with slurm/dev/start.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def plugin(install_plugin) -> str:
    """The test plugin's recipe override; PYTHONPATH reaches the jobs (sbatch exports the env)."""
    return install_plugin("slurm_test_plugin", SLURM_TEST_PLUGIN)


# --------------------------------------------------------------------------- helpers


def squeue(job_id: str) -> tuple[str, str]:
    """(state, reason) of a job squeue still knows; ("", "") otherwise."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True)
    fields = out.stdout.strip().split("|")
    return (fields[0], fields[1]) if len(fields) == 2 else ("", "")


def release_if_held(job_id: str) -> None:
    """Let a requeued job start now instead of after Slurm's two-minute hold."""
    if squeue(job_id) == ("PENDING", "BeginTime"):
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)


def status_of(run_dir: str) -> dict:
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def wait_for(done, seconds: float, what: str, job_id: str, log: str) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        release_if_held(job_id)
        if time.monotonic() > deadline:
            tail = Path(log).read_text()[-3000:] if Path(log).exists() else "(no log)"
            pytest.fail(f"timed out after {seconds:.0f}s waiting for {what}; job {job_id} log tail:\n{tail}")
        time.sleep(1)


def wait_until_finished(record, seconds: float = 240, statuses=("completed", "failed")) -> dict:
    """The run's final status.json, once its job has left the queue or completed."""

    def finished() -> bool:
        run_done = status_of(record.run_dir).get("status") in statuses
        return run_done and squeue(record.job_id)[0] in ("", "COMPLETED")

    wait_for(finished, seconds, f"run {record.run_id} to finish", record.job_id, record.log)
    return status_of(record.run_dir)


def accounting_states(job_id: str) -> list[str]:
    """Every state sacct recorded for the finished job, requeued allocations included (-D).

    slurmctld reports to slurmdbd asynchronously: wait (briefly) for the final state to land.
    """
    command = ["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job_id]
    for _ in range(30):
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        states = [line.split()[0] for line in out.stdout.splitlines()]
        if states and states[-1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"):
            break
        time.sleep(1)
    return states


def logged_rows(run_dir: str, name: str) -> list[tuple[int, float]]:
    """(step, value) of metric ``name`` from the run's raw chunks (not the deduplicating index)."""
    rows = []
    for chunk in sorted((Path(run_dir) / "metrics").glob("*.jsonl")):
        for line in chunk.read_text().splitlines():
            row = json.loads(line)
            if row["name"] == name:
                rows.append((row["step"], row["value"]))
    return rows


def final_evals(root: Path, run_id: str) -> dict[str, float]:
    sql = (
        f"SELECT evaluator || '/' || metric AS k, value FROM evals WHERE run_id = '{run_id}' "
        f"AND step = (SELECT max(step) FROM evals WHERE run_id = '{run_id}')"
    )
    return {row["k"]: row["value"] for row in json.loads(query(str(root), sql, "json"))}


def write_recipe(tmp_path: Path, name: str, extra: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(TINY_RECIPE).replace('name = "tiny"', f'name = "{name}"') + extra)
    return path


def slurm_run(recipe: Path, root: Path, *overrides: str) -> list[Submission]:
    """``vlforge run --launcher slurm``; returns the recorded submissions."""
    assert main(["run", str(recipe), "--launcher", "slurm", *overrides, "--runs-root", str(root)]) == 0
    return read_submissions(str(root))


# --------------------------------------------------------------------------- tests


def test_two_tasks_one_process_group_results_indexed_with_the_job_id(tmp_path, plugin, capsys):
    root = tmp_path / "runs"
    recipe = write_recipe(tmp_path, "quick")
    [record] = slurm_run(recipe, root, 'launch.profile="dev"', "launch.nproc=2", plugin)
    out = capsys.readouterr().out
    assert f"submitted as Slurm job {record.job_id}" in out and record.log in out

    status = wait_until_finished(record)
    assert status["status"] == "completed" and status["slurm_job_ids"] == [record.job_id]
    ranks = [json.loads((Path(record.run_dir) / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank_sum"] for r in ranks] == [3.0, 3.0]  # 1 + 2: both ranks in one all_reduce
    assert {r["world_size"] for r in ranks} == {2} and len({(r["master"], r["port"]) for r in ranks}) == 1
    assert Path(record.log).exists() and Path(record.log.replace("_0_log", "_1_log")).exists()

    sql = f"SELECT slurm_job_id, status, world_size FROM runs WHERE run_id = '{record.run_id}'"
    assert json.loads(query(str(root), sql, "json")) == [
        {"slurm_job_id": record.job_id, "status": "completed", "world_size": 2}
    ]
    assert final_evals(root, record.run_id)  # the retrieval evaluator ran at the end
    assert accounting_states(record.job_id) == ["COMPLETED"]
    assert slurm_states([record.job_id]) == {record.job_id: "COMPLETED"}  # from sacct: accounting works
    assert main(["status", "--runs-root", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split() == [record.job_id, record.run_id, "quick", "COMPLETED", "completed", "6/6", "0"]
    assert table[-1].split() == [record.job_id, record.log]


def test_preempted_run_requeues_and_resumes_to_the_uninterrupted_result(tmp_path, plugin, monkeypatch):
    root = tmp_path / "runs"
    recipe = write_recipe(tmp_path, "preempt")
    overrides = [plugin, "train.steps=24", "train.checkpoint_every=4"]  # one task: cheap reference
    monkeypatch.setenv("FIRST_ALLOCATION_STEP_S", "0.5")
    [record] = slurm_run(recipe, root, 'launch.profile="dev"', *overrides)
    first_checkpoint = Path(record.run_dir) / "checkpoints" / "step_00000004" / "manifest.json"
    wait_for(first_checkpoint.exists, 180, "the first checkpoint", record.job_id, record.log)

    # A job of the high-priority partition wants the whole node: Slurm preempts the run.
    preemptor = [
        "sbatch",
        "--parsable",
        "-p",
        "high",
        "--exclusive",
        "-J",
        "vlforge-test-preemptor",
        f"--output={tmp_path}/preemptor-%j.out",
    ]  # not slurm-<id>.out in the working directory
    preemptor_id = subprocess.run(
        [*preemptor, "--wrap", "sleep 1"], capture_output=True, text=True, check=True
    ).stdout.strip()
    status = wait_until_finished(record)

    attempts = status["attempts"]
    assert [a["status"] for a in attempts] == ["preempted", "completed"]
    assert {a["slurm_job_id"] for a in attempts} == {record.job_id}  # the same job, requeued
    assert accounting_states(preemptor_id) == ["COMPLETED"]
    assert accounting_states(record.job_id) == ["REQUEUED", "COMPLETED"]
    assert "requeued (1 of at most 3 requeues)" in Path(record.log).read_text()

    losses = logged_rows(record.run_dir, "train/loss")
    assert [step for step, _ in losses] == list(range(1, 25))  # one curve, no step logged twice
    monkeypatch.setenv("FIRST_ALLOCATION_STEP_S", "0")
    assert main(["run", str(recipe), *overrides, "--runs-root", str(tmp_path / "reference")]) == 0
    [reference_dir] = (tmp_path / "reference" / "tests").iterdir()
    assert losses == logged_rows(str(reference_dir), "train/loss")
    assert final_evals(root, record.run_id) == final_evals(tmp_path / "reference", reference_dir.name)


def test_killed_training_process_requeues_and_resumes_to_the_uninterrupted_result(
    tmp_path, plugin, monkeypatch
):
    root = tmp_path / "runs"
    recipe = write_recipe(tmp_path, "crash")
    overrides = [plugin, "train.steps=12", "train.checkpoint_every=4"]
    # Killed as step 8 begins: steps 5-7 are logged (slow steps: flushed) but not checkpointed.
    monkeypatch.setenv("KILL_AT_STEP", "7")
    monkeypatch.setenv("FIRST_ALLOCATION_STEP_S", "0.6")
    [record] = slurm_run(recipe, root, 'launch.profile="dev"', *overrides)
    status = wait_until_finished(record)

    assert (Path(record.run_dir) / "killed").exists()
    first, second = status["attempts"]
    assert (first["status"], second["status"]) == ("failed", "completed") and status["status"] == "completed"
    assert first["reason"].startswith("the training process was killed by SIGKILL on rank 0; requeued")
    assert {first["slurm_job_id"], second["slurm_job_id"]} == {record.job_id}  # the same job, requeued
    assert accounting_states(record.job_id) == ["REQUEUED", "COMPLETED"]
    assert "job " + record.job_id + " requeued (1 of at most 3 requeues)" in Path(record.log).read_text()
    [*_, (last, _)] = list_checkpoints(record.run_dir)
    assert last == 12
    raw_steps = [step for step, _ in logged_rows(record.run_dir, "train/loss")]
    assert sorted(set(raw_steps)) == list(range(1, 13)) and len(raw_steps) > 12  # some logged twice

    # The index holds every step once: the steps the killed attempt logged past its checkpoint
    # are replaced by the resumed attempt's; the curve is the uninterrupted run's.
    sql = (
        f"SELECT step, value FROM metrics WHERE run_id = '{record.run_id}' "
        "AND name = 'train/loss' ORDER BY step"
    )
    indexed = [(row["step"], row["value"]) for row in json.loads(query(str(root), sql, "json"))]
    assert [step for step, _ in indexed] == list(range(1, 13))
    monkeypatch.delenv("KILL_AT_STEP")
    monkeypatch.setenv("FIRST_ALLOCATION_STEP_S", "0")
    assert main(["run", str(recipe), *overrides, "--runs-root", str(tmp_path / "reference")]) == 0
    [reference_dir] = (tmp_path / "reference" / "tests").iterdir()
    assert indexed == logged_rows(str(reference_dir), "train/loss")
    assert final_evals(root, record.run_id) == final_evals(tmp_path / "reference", reference_dir.name)


def test_time_limit_signal_checkpoints_requeues_and_completes(tmp_path, plugin, monkeypatch):
    root = tmp_path / "runs"
    profile = tmp_path / "one-minute.toml"
    # USR2 1 s before the limit, give or take slurmctld's 30 s timer: 29-59 s into each allocation.
    dev = REPO / "slurm/profiles/dev.toml"
    profile.write_text(f'extends = "{dev}"\ntime_limit = "0:01:00"\nsignal_delay_s = 1\n')
    recipe = write_recipe(tmp_path, "timelimit")
    monkeypatch.setenv("FIRST_ALLOCATION_STEP_S", "2")  # 30 steps would take 60 s in the first one
    overrides = [f'launch.profile="{profile}"', plugin, "train.steps=30", "train.checkpoint_every=100"]
    [record] = slurm_run(recipe, root, *overrides)
    status = wait_until_finished(record, seconds=300)

    first, *later = status["attempts"]
    assert first["status"] == "preempted" and later and later[-1]["status"] == "completed"
    # The signal stopped the first allocation at a step boundary, before its time limit.
    assert accounting_states(record.job_id)[0] == "REQUEUED"
    assert "TIMEOUT" not in accounting_states(record.job_id)
    assert "requeued (1 of at most 3 requeues)" in Path(record.log).read_text()
    assert [step for step, _ in logged_rows(record.run_dir, "train/loss")] == list(range(1, 31))
    # The stop checkpoint the next allocation resumed from, and the final one.
    [(stopped_at, _), (last, _)] = list_checkpoints(record.run_dir)
    assert 0 < stopped_at < last == 30


def test_sweep_of_four_is_one_array_of_four_indexed_runs(tmp_path):
    root = tmp_path / "runs"
    recipe = write_recipe(tmp_path, "sweep", '\n[sweep.grid]\n"optim.lr" = [1e-3, 3e-3]\n')
    assert main(["sweep", str(recipe), 'launch.profile="dev"', "seed=0,1", "--runs-root", str(root)]) == 0
    records = read_submissions(str(root))
    array_id = records[0].job_id.split("_")[0]
    assert [r.job_id for r in records] == [f"{array_id}_{i}" for i in range(4)]
    for record in records:
        assert wait_until_finished(record)["status"] == "completed"

    columns = {
        "i": "sweep.index",
        "lr": "sweep.overrides.optim.lr",
        "seed": "sweep.overrides.seed",
        "used_lr": "optim.lr",
        "used_seed": "seed",
    }
    picks = ", ".join(f"max(c.value_num) FILTER (c.key = '{key}') AS {name}" for name, key in columns.items())
    sql = (
        f"SELECT r.slurm_job_id AS job, {picks} FROM runs r JOIN configs c USING (run_id) "
        "WHERE r.status = 'completed' GROUP BY 1 ORDER BY 2"
    )
    rows = json.loads(query(str(root), sql, "json"))
    expected = [(1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
    assert [(r["job"], r["i"], r["lr"], r["seed"]) for r in rows] == [
        (f"{array_id}_{i}", i, lr, seed) for i, (lr, seed) in enumerate(expected)
    ]
    assert all(r["used_lr"] == r["lr"] and r["used_seed"] == r["seed"] for r in rows)


def test_cancel_stops_at_a_checkpoint_and_resume_continues_on_slurm(tmp_path, plugin, monkeypatch, capsys):
    root = tmp_path / "runs"
    recipe = write_recipe(tmp_path, "cancel")
    monkeypatch.setenv("FIRST_ALLOCATION_STEP_S", "0.5")
    overrides = ['launch.profile="dev"', plugin, "train.steps=30", "train.checkpoint_every=4"]
    [record] = slurm_run(recipe, root, *overrides)
    first_checkpoint = Path(record.run_dir) / "checkpoints" / "step_00000004" / "manifest.json"
    wait_for(first_checkpoint.exists, 180, "the first checkpoint", record.job_id, record.log)

    assert main(["cancel", record.run_id, "--runs-root", str(root)]) == 0
    assert "asked to stop at the next step (SIGINT)" in capsys.readouterr().out
    status = wait_until_finished(record, seconds=120, statuses=("interrupted",))
    assert accounting_states(record.job_id) == ["COMPLETED"]  # it ended by itself, not requeued
    [*_, (stopped_at, _)] = list_checkpoints(record.run_dir)
    assert 4 <= stopped_at == status["last_step"] < 30

    # Without repeating train.steps=30: a resumed run trains what it was started with.
    monkeypatch.setenv("FIRST_ALLOCATION_STEP_S", "0")
    resumed, _ = slurm_run(recipe, root, 'launch.profile="dev"', "--resume", record.run_id)
    assert resumed.run_id == record.run_id and resumed.job_id != record.job_id and resumed.steps == 30
    status = wait_until_finished(resumed)
    assert [a["status"] for a in status["attempts"]] == ["interrupted", "completed"]
    assert status["slurm_job_ids"] == [record.job_id, resumed.job_id]
    assert [step for step, _ in logged_rows(record.run_dir, "train/loss")] == list(range(1, 31))
    capsys.readouterr()
    assert main(["cancel", record.run_id, "--runs-root", str(root)]) == 0
    assert capsys.readouterr().out.count("already COMPLETED") == 2  # both jobs of the run


def test_unknown_partition_is_refused_before_submitting(tmp_path, capsys):
    root = tmp_path / "runs"
    profile = tmp_path / "typo-partition.toml"
    profile.write_text('partition = "debgu"\n')
    recipe = write_recipe(tmp_path, "badpartition")
    args = [
        "run",
        str(recipe),
        "--launcher",
        "slurm",
        f'launch.profile="{profile}"',
        "--runs-root",
        str(root),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "partition: partition 'debgu' does not exist on this cluster; did you mean 'debug'?" in err
    assert "(partitions: debug, high)" in err and str(profile) in err
    assert not root.exists()  # no run directory, no submission record
