"""Watching runs: sinks (TensorBoard, W&B, MLflow), log.txt, system metrics, live index, plots, logs -f."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vlforge.cli import main
from vlforge.launch.follow import follow_run
from vlforge.results import RunWriter, build_index
from vlforge.results import queries as results_queries
from vlforge.results.queries import plot_metric, query
from vlforge.steptimer import StepTimer

from .conftest import REPO, TINY_RECIPE

# A test plugin: a sink that fails on every call, and loop hooks that pause or kill the run at
# steps given by environment variables (so that a resumed run, which rereads its recipe from
# the run directory, is not told to stop again).
WATCH_PLUGIN = """
import os, signal, time
from vlforge.hookspecs import hookimpl
from vlforge.registry import ComponentConfig

CALLS = []

class BrokenSink:
    def start(self, run):
        return {}

    def log_metrics(self, step, metrics):
        CALLS.append(step)
        raise ConnectionError("tracker unreachable")

    def finish(self, status):
        CALLS.append(status)
        raise ConnectionError("tracker unreachable")

@hookimpl
def vlforge_register_components(registry):
    registry.add("sink", "test.broken", config=ComponentConfig, factory=lambda config, ctx: BrokenSink())

@hookimpl
def vlforge_step_start(state):
    time.sleep(float(os.environ.get("WATCH_STEP_S", "0")))

@hookimpl
def vlforge_log(state, metrics):
    if state.step == int(os.environ.get("WATCH_PAUSE_AT", "-1")):
        time.sleep(1.2)  # longer than the live flush interval: this step's rows are written
    if state.step == int(os.environ.get("WATCH_KILL_AT", "-1")):
        time.sleep(1.5)  # the sinks' thread sends what was written, then a hard kill
        os.kill(os.getpid(), signal.SIGKILL)
"""

SINKS = """
[sinks.tb]
type = "tensorboard"

[sinks.wb]
type = "wandb"
mode = "offline"

[sinks.ml]
type = "mlflow"
tracking_uri = "{uri}"
"""


@pytest.fixture
def plugin(install_plugin, monkeypatch) -> str:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store, as tests use it
    monkeypatch.setenv("WANDB_SILENT", "true")
    return install_plugin("watch_test_plugin", WATCH_PLUGIN)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlforge.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def only_run_dir(root: Path) -> Path:
    (run_dir,) = [p.parent for p in root.glob("*/*/status.json")]
    return run_dir


def index_losses(root: Path, run_id: str) -> dict[int, float]:
    sql = f"SELECT step, value FROM metrics WHERE run_id = '{run_id}' AND name = 'train/loss' ORDER BY step"
    return {r["step"]: r["value"] for r in json.loads(query(str(root), sql, "json"))}


# -- each tracker's own reader ----------------------------------------------------------------


def tensorboard_losses(log_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def wandb_records(path: Path):
    """The records of a W&B offline run file (a LevelDB-style log of wandb's own protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, or middle/last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_losses(run_dir: Path) -> tuple[set[str], list[tuple[int, float]]]:
    ids, losses = set(), []
    for path in sorted(run_dir.glob("wandb/offline-run-*/*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
                }
                if "train/loss" in items:
                    losses.append((items["_step"], items["train/loss"]))
    return ids, sorted(losses)


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


# -- sinks end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_and_resumed_run_continues_the_same_tracker_runs_without_a_step_twice(tmp_path, write, plugin):
    uri = (tmp_path / "mlruns").as_uri()
    recipe = write("tiny.toml", TINY_RECIPE + SINKS.format(uri=uri))
    root = tmp_path / "runs"
    common = [str(recipe), plugin, "--runs-root", str(root)]

    killed = cli("run", *common, env={"WATCH_PAUSE_AT": "4", "WATCH_KILL_AT": "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = only_run_dir(root)
    run_id = run_dir.name
    trackers = json.loads((run_dir / "trackers.json").read_text())
    assert {name: t["last_step"] for name, t in trackers.items()} == {"tb": 4, "wb": 4, "ml": 4}
    first_mlflow_id = trackers["ml"]["run"]["run_id"]

    resumed = cli("run", *common, "--resume", run_id)  # from the checkpoint at step 3
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses = index_losses(root, run_id)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]

    tb = tensorboard_losses(run_dir / "tensorboard")
    assert [step for step, _ in tb] == [1, 2, 3, 4, 5, 6]  # step 4 once, from the first attempt
    assert all(value == pytest.approx(losses[step], abs=1e-5) for step, value in tb)

    wandb_ids, wandb_steps = wandb_losses(run_dir)
    assert wandb_ids == {run_id} and len(list(run_dir.glob("wandb/offline-run-*"))) == 2
    # W&B's service process writes its files asynchronously: what it held when the first attempt
    # was SIGKILLed may be lost (a preemption's SIGTERM/USR2 lets it finish). Never a step twice.
    steps = [step for step, _ in wandb_steps]
    assert len(steps) == len(set(steps)) and {5, 6} <= set(steps) <= {1, 2, 3, 4, 5, 6}
    assert all(value == pytest.approx(losses[step], abs=1e-5) for step, value in wandb_steps)

    client, (mlflow_run,) = mlflow_runs(uri, "tests")  # one MLflow run over both attempts
    assert mlflow_run.info.run_id == first_mlflow_id and mlflow_run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(first_mlflow_id, "train/loss"))
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6]
    evals = client.get_metric_history(first_mlflow_id, "eval/retrieval/i2t_r1")
    assert [m.step for m in evals] == [6]
    assert mlflow_run.data.params["optim.lr"] == "0.001"

    log = (run_dir / "log.txt").read_text()
    assert log.count("attempt started") == 2
    assert "step 6/6 loss=" in log and log.rstrip().endswith(f"vlforge: run {run_id} completed")


@pytest.mark.slow
def test_a_failing_sink_warns_once_and_leaves_training_and_index_intact(
    tiny_recipe, runs_root, plugin, capsys
):
    import watch_test_plugin

    assert main(["run", str(tiny_recipe), plugin, 'sinks.bad.type="test.broken"']) == 0
    err = capsys.readouterr().err
    assert err.count("sink 'bad' (test.broken) failed: ConnectionError: tracker unreachable") == 1
    # Called again after failing (each flush's first step; the rest of a failing batch is skipped).
    calls = watch_test_plugin.CALLS
    assert (
        calls[0] == 1 and calls[-1] == "completed" and len(calls) >= 3 and calls[1:-1] == sorted(calls[1:-1])
    )
    run_dir = only_run_dir(runs_root)
    assert (run_dir / "log.txt").read_text().count("sink 'bad'") == 1
    assert sorted(index_losses(runs_root, run_dir.name)) == [1, 2, 3, 4, 5, 6]
    status = json.loads(query(str(runs_root), "SELECT status FROM runs", "json"))
    assert status == [{"status": "completed"}]


def test_a_missing_tracker_package_names_the_extra(tiny_recipe, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert main(["validate", str(tiny_recipe), 'sinks.wb.type="wandb"']) == 2
    err = capsys.readouterr().err
    assert "sinks.wb" in err and "pip install 'vlforge[wandb]'" in err


# -- log.txt, progress lines and system metrics -----------------------------------------------


@pytest.mark.slow
def test_log_progress_lines_and_plausible_system_metrics(tiny_recipe, runs_root, capsys):
    assert main(["run", str(tiny_recipe), "train.steps=8", "train.log_every=2"]) == 0
    out = capsys.readouterr().out
    run_dir = only_run_dir(runs_root)
    for step in (2, 4, 6, 8):  # progress = false: plain lines on the terminal and in the log
        assert f"step {step}/8 loss=" in out
    log = (run_dir / "log.txt").read_text()
    assert [line.split()[2] for line in log.splitlines() if " step " in line] == ["2/8", "4/8", "6/8", "8/8"]
    assert log.rstrip().endswith("completed")

    sql = "SELECT step, name, value FROM metrics WHERE name LIKE 'sys/%'"
    by_step: dict[int, dict[str, float]] = {}
    for row in json.loads(query(str(runs_root), sql, "json")):
        by_step.setdefault(row["step"], {})[row["name"]] = row["value"]
    assert sorted(by_step) == [2, 4, 6, 8]
    # Over the run (one window can catch a pause of this shared machine between two phases):
    parts = sum(m["sys/data_wait_s"] + m["sys/fwd_bwd_s"] + m["sys/optimizer_s"] for m in by_step.values())
    assert parts == pytest.approx(sum(m["sys/step_s"] for m in by_step.values()), rel=0.10)
    for m in by_step.values():
        assert m["sys/data_wait_s"] > 0 and m["sys/fwd_bwd_s"] > m["sys/optimizer_s"] > 0
        assert m["sys/samples_per_s_per_gpu"] == pytest.approx(16 / m["sys/step_s"], rel=0.01)
        assert 16 * 2 <= m["sys/tokens_per_s_per_gpu"] * m["sys/step_s"] <= 16 * 16  # 2..16 tokens
        assert 0.1 < m["sys/host_rss_gb"] < 24


def test_step_timer_splits_a_step_into_data_compute_and_optimizer():
    timer = StepTimer(torch.device("cpu"))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[:, 7:] = 0
    for _ in range(3):
        timer.begin_step()
        with timer.phase("data"):
            time.sleep(0.02)
            timer.count({"attention_mask": mask, "images": torch.zeros(4, 3, 2, 2)})
        with timer.phase("compute"):
            time.sleep(0.03)
        with timer.phase("optimizer"):
            time.sleep(0.01)
        timer.end_step()
    m = timer.read()
    # At least what each phase slept (a loaded machine may wake the sleeper late).
    assert m["sys/data_wait_s"] >= 0.02 and m["sys/fwd_bwd_s"] >= 0.03 and m["sys/optimizer_s"] >= 0.01
    parts = m["sys/data_wait_s"] + m["sys/fwd_bwd_s"] + m["sys/optimizer_s"]
    assert parts == pytest.approx(m["sys/step_s"], rel=0.10)
    assert m["sys/tokens_per_s_per_gpu"] / m["sys/samples_per_s_per_gpu"] == pytest.approx(7.0)
    assert timer.read() == {}  # a new window starts empty


# -- the live index ---------------------------------------------------------------------------


@pytest.mark.slow
def test_query_sees_a_running_runs_latest_logged_step_within_one_log_interval(
    tiny_recipe, runs_root, plugin, capsys
):
    env = {"WATCH_STEP_S": "0.15", "VLFORGE_RUNS": str(runs_root)}  # log interval: 10 × 0.15 s
    args = [sys.executable, "-m", "vlforge.cli", "run", str(tiny_recipe), plugin, "train.steps=40"]
    proc = subprocess.Popen(
        [*args, "train.log_every=10", "train.checkpoint_every=0"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        seen = []
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline and proc.poll() is None:
            logs = list(runs_root.glob("*/*/log.txt"))
            steps = [int(line.split()[2].split("/")[0]) for line in logs[0].read_text().splitlines()
                     if " step " in line] if logs else []  # fmt: skip
            if not steps or steps[-1] == 40 or (seen and steps[-1] == seen[-1][0]):
                time.sleep(0.1)
                continue
            run_id = logs[0].parent.name
            sql = f"SELECT max(m.step), any_value(r.status) FROM metrics m JOIN runs r USING (run_id) WHERE run_id = '{run_id}'"  # noqa: E501
            assert main(["query", sql, "--format", "json"]) == 0
            (row,) = json.loads(capsys.readouterr().out)
            seen.append((steps[-1], row))
        assert len(seen) == 2, "the run ended before it could be watched"
        for logged, row in seen:  # what the run had logged when the query began is in the index
            assert row["max(m.step)"] >= logged and row["any_value(r.status)"] == "running"
    finally:
        proc.wait(timeout=180)
    assert proc.returncode == 0


# -- plots ------------------------------------------------------------------------------------


def _run(root: Path, recipe: str, lr: float, scale: float) -> str:
    run = RunWriter.create(
        str(root), "exp", recipe_name=recipe, recipe_toml="", config={"optim": {"lr": lr}}, flush_every=100
    )
    for step in range(1, 6):
        run.log_metrics(step, {"train/loss": scale / step})
    run.log_eval(5, "retrieval", {"i2t_r1": scale / 10})
    run.close()
    time.sleep(0.01)  # distinct start times
    return run.run_id


def test_plot_draws_eval_metrics_labels_by_config_key_and_defaults_to_the_latest_run(tmp_path, monkeypatch):
    ids = [_run(tmp_path, "a", 1e-3, 1.0), _run(tmp_path, "a", 3e-4, 2.0), _run(tmp_path, "b", 1e-3, 3.0)]
    build_index(str(tmp_path))
    drawn = {}
    monkeypatch.setattr(results_queries, "_draw", lambda curves, *a: drawn.update(curves=curves))
    png = str(tmp_path / "c.png")

    assert plot_metric(str(tmp_path), "train/loss", png) == 1  # no selection: the latest run
    assert list(drawn["curves"]) == [ids[2]]
    assert plot_metric(str(tmp_path), "train/loss", png, recipe="a", label="optim.lr") == 2
    assert drawn["curves"] == {
        "optim.lr=0.001": ([1, 2, 3, 4, 5], [1.0, 0.5, 1 / 3, 0.25, 0.2]),
        "optim.lr=0.0003": ([1, 2, 3, 4, 5], [2.0, 1.0, 2 / 3, 0.5, 0.4]),
    }
    assert plot_metric(str(tmp_path), "eval/retrieval/i2t_r1", png, where="true", label="optim.lr") == 3
    assert set(drawn["curves"]) == {
        f"optim.lr=0.001 ({ids[0]})",
        f"optim.lr=0.001 ({ids[2]})",
        "optim.lr=0.0003",
    }
    assert drawn["curves"]["optim.lr=0.0003"] == ([5], [0.2])
    with pytest.raises(results_queries.QueryError, match="did you mean 'optim.lr'"):
        plot_metric(str(tmp_path), "train/loss", png, label="optim.l")


# -- logs -f ----------------------------------------------------------------------------------


def test_logs_follow_prints_new_lines_until_the_run_ends(tmp_path):
    run = RunWriter.create(str(tmp_path), "exp", recipe_name="r", recipe_toml="", config={})
    log = Path(run.run_dir) / "log.txt"
    log.write_text("first\n")

    def training() -> None:
        with log.open("a") as f:
            for i in range(5):
                time.sleep(0.05)
                f.write(f"line {i}\n")
                f.flush()
            f.write("half a li")  # not shown until the line is complete
        run.close("completed")

    writer = threading.Thread(target=training)
    writer.start()
    out = io.StringIO()
    assert follow_run(run.run_dir, poll_s=0.02, out=out) == "completed"
    writer.join()
    assert out.getvalue() == "first\n" + "".join(f"line {i}\n" for i in range(5))
    once = io.StringIO()
    assert follow_run(run.run_dir, follow=False, out=once) == "completed"
    assert once.getvalue() == out.getvalue()
