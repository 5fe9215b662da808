"""Slurm launching without a cluster: profiles, plans, sbatch scripts, sweeps, requeue rules.

Bad input is refused before anything is submitted: each case checks that the runs root
stays empty (no run directory, no ``.slurm`` records).
"""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlforge.cli import main
from vlforge.launch import slurm
from vlforge.launch.profiles import load_profile, slurm_minutes
from vlforge.launch.sweep import element_overrides, split_sweep_args, sweep_points
from vlforge.launch.worker import RunJob
from vlforge.recipe import SweepSection, load_recipe

from .conftest import REPO


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    """write_profile(name, text): a profile in a folder searched first."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setenv("VLFORGE_SLURM_PROFILES", str(folder))

    def write_profile(name: str, text: str):
        path = folder / f"{name}.toml"
        path.write_text(text)
        return path

    return write_profile


def slurm_run(recipe, *overrides: str) -> int:
    return main(["run", str(recipe), "--launcher", "slurm", *overrides])


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        (90, 90),
        ("90", 90),
        ("1:30", 2),
        ("0:01:00", 1),
        ("2:00:00", 120),
        ("1-2", 1560),
        ("2-00:00:00", 2880),
    ],
)
def test_slurm_time_formats(text, minutes):
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["1h", "0", "-5", "1:2:3:4"])
def test_slurm_time_refuses_nonsense(text):
    with pytest.raises(ValueError):
        slurm_minutes(text)


def test_profile_key_typo_names_key_file_and_valid_keys(tiny_recipe, profiles, runs_root, capsys):
    path = profiles("typo", 'partition = "debug"\ngpus_per_nod = 2\ntime_limit = "1h"\n')
    assert slurm_run(tiny_recipe, 'launch.profile="typo"') == 2
    err = capsys.readouterr().err
    assert f"profile {path}: 2 problems" in err
    assert "gpus_per_nod: unknown key; did you mean 'gpus_per_node'?" in err
    assert "valid keys: account, constraint, cpus_per_task" in err
    assert "time_limit: " in err and "'1h' is not a Slurm time" in err
    assert not runs_root.exists()


def test_unknown_profile_lists_the_profiles(tiny_recipe, runs_root, capsys):
    assert slurm_run(tiny_recipe, 'launch.profile="dev-hihg"') == 2
    err = capsys.readouterr().err
    assert "launch.profile: unknown profile 'dev-hihg'; did you mean 'dev-high'?" in err
    assert "a100, dev, dev-high" in err
    assert not runs_root.exists()


def test_missing_profile_is_a_recipe_error(tiny_recipe, runs_root, capsys):
    assert slurm_run(tiny_recipe) == 2
    assert "launch.profile: the slurm launcher needs a cluster profile" in capsys.readouterr().err


def test_more_gpus_than_the_nodes_have_is_refused(tiny_recipe, profiles, runs_root, capsys):
    profiles("twogpu", 'partition = "debug"\ngpus_per_node = 2\n')
    assert slurm_run(tiny_recipe, 'launch.profile="twogpu"', "launch.nproc=4") == 2
    err = capsys.readouterr().err
    assert "launch.nproc: 4 processes per node need 4 GPUs, but the nodes of profile 'twogpu' have 2" in err
    assert not runs_root.exists()


def test_world_size_must_divide_the_global_batch(tiny_recipe, profiles, runs_root, capsys):
    profiles("eight", 'partition = "debug"\ngpus_per_node = 8\n')
    assert slurm_run(tiny_recipe, 'launch.profile="eight"', "launch.nodes=4") == 2
    assert "train.batch_size: global batch 16 is not divisible by accum_steps × world size = 1 × 32" in (
        capsys.readouterr().err
    )


def test_gpu_plan_one_task_per_gpu_and_its_sbatch_script(tiny_recipe, tmp_path):
    recipe, _ = load_recipe(
        tiny_recipe,
        ['launch.launcher="slurm"', 'launch.profile="a100"', "launch.nodes=2", "train.batch_size=64"],
    )
    plan = slurm.plan_launch(recipe, str(tiny_recipe), str(tmp_path / "runs"))
    assert (plan.world_size, plan.tasks_per_node, plan.gpus_per_node) == (16, 8, 8)
    assert "global batch 64 = 16 ranks × 1 accumulation × 4 per rank" in plan.describe(recipe)
    script = plan.sbatch_script()
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --mem=983040M",  # 120 GB per GPU × 8
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my-project",
        "#SBATCH --constraint=a100-80gb",
        "#SBATCH --time=2880",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        "module load cuda/12.4",
    ]:
        assert line in script.splitlines(), line
    assert f"--output {tmp_path}/runs/.slurm/logs/%j/%j_%t_log.out" in script
    array = plan.sbatch_script(array_size=5)
    assert "#SBATCH --array=0-4%5" in array and "%A_%a_%t_log.out" in array


def test_recipe_time_limit_overrides_the_profile(tiny_recipe, tmp_path):
    recipe, _ = load_recipe(tiny_recipe, ['launch.profile="dev"', 'launch.time_limit="0:01:00"'])
    plan = slurm.plan_launch(recipe, str(tiny_recipe), str(tmp_path))
    assert plan.time_min == 1 and "#SBATCH --time=1" in plan.sbatch_script()
    assert load_profile(REPO / "slurm/profiles/dev.toml").time_min == 30


def test_dev_high_profile_extends_dev():
    high = load_profile(REPO / "slurm/profiles/dev-high.toml")
    assert (high.partition, high.signal_delay_s, high.name) == ("high", 30, "dev-high")


@pytest.mark.parametrize(
    ("state", "restarts", "refused"),
    [
        ("RUNNING", 0, None),
        ("RUNNING", 2, None),
        ("RUNNING", 3, "already requeued 3 time(s), launch.max_requeues = 3"),
        ("COMPLETING", 0, "the job is COMPLETING"),  # scancel, or the time limit's SIGTERM
        ("PENDING", 0, "the job is PENDING"),  # Slurm requeued it already
    ],
)
def test_requeue_only_running_jobs_within_the_limit(state, restarts, refused):
    reason = slurm.requeue_refusal(state, restarts, max_requeues=3)
    assert reason is None if refused is None else refused in reason


@pytest.mark.parametrize(
    ("exit_code", "received", "run_status", "outcome"),
    [
        (0, [], "completed", ("completed", None)),
        (3, [], "preempted", ("preempted", None)),
        (130, [], "interrupted", ("interrupted", None)),
        (1, [], "failed", ("failed", None)),  # failed by itself, with a final status: no requeue
        (1, [], "running", ("failed", "the training process exited without a final status")),
        (2, [], "running", ("failed", "the training process exited with code 2 and no final status")),
        (-signal.SIGKILL, [], "running", ("failed", "the training process was killed by SIGKILL")),
        (-signal.SIGSEGV, [], "running", ("failed", "the training process was killed by SIGSEGV")),
        # a stop signal forwarded before the child installed its handlers: still that stop
        (-signal.SIGUSR2, [signal.SIGUSR2], "running", ("preempted", None)),
        (-signal.SIGINT, [signal.SIGINT], "running", ("interrupted", None)),
    ],
)
def test_a_training_process_without_a_final_status_is_a_crash(
    tmp_path, monkeypatch, exit_code, received, run_status, outcome
):
    (tmp_path / "status.json").write_text(json.dumps({"status": run_status}))
    monkeypatch.setattr(slurm, "_received", received)
    monkeypatch.setenv("RANK", "0")
    assert slurm._child_outcome(exit_code, str(tmp_path)) == outcome


def test_a_crashed_attempt_is_recorded_failed_with_its_reason(tmp_path):
    attempts = [{"start_time": "t0", "status": "preempted"}, {"start_time": "t1"}]
    (tmp_path / "status.json").write_text(json.dumps({"status": "running", "attempts": attempts}))
    slurm.end_crashed_attempt(str(tmp_path), "killed by SIGKILL on rank 0; requeued")
    status = json.loads((tmp_path / "status.json").read_text())
    assert (status["status"], status["reason"]) == ("failed", "killed by SIGKILL on rank 0; requeued")
    assert [a.get("status") for a in status["attempts"]] == ["preempted", "failed"]
    assert status["attempts"][-1]["end_time"] == status["end_time"]
    assert not (tmp_path / "run.lock").exists()  # taken over from the dead writer and released


@pytest.mark.parametrize(("restarts", "requeued"), [(0, True), (2, True), (3, False)])
def test_a_crash_requeues_until_max_requeues_then_the_run_fails(tmp_path, monkeypatch, restarts, requeued):
    job = RunJob("recipe.toml", (), str(tmp_path), "exp", "run1")
    Path(job.run_dir).mkdir(parents=True)
    (Path(job.run_dir) / "status.json").write_text(json.dumps({"status": "running", "attempts": [{}]}))
    calls = []
    monkeypatch.setattr(slurm, "job_state", lambda job_id: "RUNNING")
    monkeypatch.setattr(slurm, "requeue_self", lambda *args: calls.append(args) or "job 7 requeued")
    env = SimpleNamespace(job_id="7", global_rank=0)
    crash = "the training process was killed by SIGKILL"
    assert slurm.SlurmRun(job, max_requeues=3)._after_crash(job, env, restarts, crash) == "failed"

    status = json.loads((Path(job.run_dir) / "status.json").read_text())
    assert status["status"] == "failed" and status["reason"].startswith(f"{crash} on rank 0; ")
    assert calls == ([("7", restarts, 3)] if requeued else [])
    if requeued:
        assert status["reason"].endswith("requeued to resume from the last checkpoint")
    else:
        assert "job 7 not requeued: already requeued 3 time(s), launch.max_requeues = 3" in status["reason"]
        assert "vlforge run <recipe> --resume run1" in status["reason"]


def test_signals_held_during_setup_reach_the_training_loop(monkeypatch):
    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, _: received.append(signum))
    try:
        monkeypatch.setattr(slurm, "_held_signals", [])
        slurm._hold_signal(signal.SIGUSR2, None)  # arrives while the model is built
        assert received == []
        slurm.vlforge_step_start(state=None)  # the loop's first step: delivered again
        assert received == [signal.SIGUSR2] and slurm._held_signals == []
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sweep_arguments_values_and_points():
    plain, grid = split_sweep_args(
        ["optim.lr=1e-3,3e-3", "seed=0", "optim.betas=[0.9,0.95],[0.9,0.98]", "name=a,b"]
    )
    assert plain == ["seed=0"]
    assert grid == {"optim.lr": [1e-3, 3e-3], "optim.betas": [[0.9, 0.95], [0.9, 0.98]], "name": ["a", "b"]}
    section = SweepSection(grid={"optim": {"lr": [1, 2]}, "seed": [7, 8]})
    points = sweep_points(section, {"seed": [0, 1, 2]})  # the command line replaces seed
    assert points == [{"optim.lr": lr, "seed": s} for lr in (1, 2) for s in (0, 1, 2)]
    listed = SweepSection(points=[{"optim": {"lr": 1}}, {"seed": 3}])
    assert sweep_points(listed, {}) == [{"optim.lr": 1}, {"seed": 3}]


def test_sweep_element_recipe_records_index_and_overrides(tiny_recipe):
    recipe, _ = load_recipe(
        tiny_recipe, element_overrides({"optim.lr": 3e-3, "data.type": "synthetic.shapes"}, 2)
    )
    assert recipe.optim.lr == 3e-3
    assert recipe.resolved()["sweep"] == {
        "index": 2,
        "overrides": {"optim.lr": 3e-3, "data.type": "synthetic.shapes"},
    }


def test_run_refuses_a_recipe_with_a_sweep(tiny_recipe, runs_root, capsys):
    tiny_recipe.write_text(tiny_recipe.read_text() + '\n[sweep.grid]\n"optim.lr" = [1e-3, 3e-3]\n')
    assert main(["run", str(tiny_recipe)]) == 2
    assert "defines a [sweep]: submit it with `vlforge sweep" in capsys.readouterr().err


def test_status_lists_recorded_submissions_newest_first(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    (root / ".slurm/jobs").mkdir(parents=True)
    # An array submitted last (elements in array order), then an older single job.
    for job_id, submitted in [
        ("7_1", "2026-01-02T00:00:00Z"),
        ("7_0", "2026-01-02T00:00:00Z"),
        ("6", "2025-12-31T00:00:00Z"),
    ]:
        run_dir = str(root / "e" / job_id)
        record = slurm.Submission(
            job_id, f"run-{job_id}", "e", run_dir, "tiny", 6, 1, "debug", "x.out", submitted
        )
        (root / f".slurm/jobs/{job_id}.json").write_text(json.dumps(dataclasses.asdict(record)))
    monkeypatch.setattr(slurm, "slurm_states", lambda ids: {"7_0": "RUNNING"})
    assert main(["status", "--runs-root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:5]]
    assert [row[0] for row in rows] == ["7_0", "7_1", "6"]
    assert rows[0][3:6] == ["RUNNING", "submitted", "0/6"] and rows[1][3] == "UNKNOWN"
    assert lines[-3:] == ["  7_0  x.out", "  7_1  x.out", "  6  x.out"]  # the log paths, in full
