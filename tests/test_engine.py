"""The training loop end to end: resume, Ctrl-C, non-finite loss, two ranks, schedules."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from vlforge import checkpoint as ckpt
from vlforge.cli import main
from vlforge.engine import lr_factor, parameter_groups
from vlforge.recipe import OptimSection, ScheduleSection
from vlforge.results.queries import query

# A test plugin: an objective that wraps CLIP's and can turn NaN, and a hook that
# sends this process SIGINT after a given step (a deterministic Ctrl-C).
TEST_PLUGIN = """
import os, signal
from vlforge.hookspecs import hookimpl
from vlforge.registry import ComponentConfig

class Config(ComponentConfig):
    nan_from_step: int = -1
    interrupt_after_step: int = -1

def build(config, ctx):
    import torch
    from torch import nn
    from vlforge_plugins.clip import InfoNCEConfig, build_infonce

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build_infonce(InfoNCEConfig(), ctx)

        def forward(self, step):
            terms = self.inner(step)
            if 0 <= config.nan_from_step <= step.progress.step:
                terms = {k: v * float("nan") for k, v in terms.items()}
            return terms

        @hookimpl
        def vlforge_after_optimizer_step(self, state):
            if state.step == config.interrupt_after_step:
                os.kill(os.getpid(), signal.SIGINT)

    return Wrapped()

@hookimpl
def vlforge_register_components(registry):
    registry.add("objective", "test.wrapped_clip", config=Config, factory=build)
"""


@pytest.fixture
def test_plugin(install_plugin) -> list[str]:
    return [
        install_plugin("engine_test_plugin", TEST_PLUGIN),
        'objectives.contrastive.type="test.wrapped_clip"',
    ]


def losses(root, run_id: str) -> dict[int, float]:
    rows = json.loads(
        query(
            str(root),
            f"SELECT step, value FROM metrics WHERE run_id = '{run_id}' "
            "AND name = 'train/loss' ORDER BY step",
            "json",
        )
    )
    return {row["step"]: row["value"] for row in rows}


def run_ids(root) -> list[str]:
    rows = json.loads(query(str(root), "SELECT run_id, status FROM runs ORDER BY start_time", "json"))
    return [r["run_id"] for r in rows]


def status_of(root, run_id: str) -> dict:
    return json.loads(query(str(root), f"SELECT * FROM runs WHERE run_id = '{run_id}'", "json"))[0]


# --------------------------------------------------------------------------- unit


def test_lr_schedule_warmup_then_cosine_to_floor():
    schedule = ScheduleSection(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, schedule) == pytest.approx(0.1)
    assert lr_factor(9, 100, schedule) == pytest.approx(1.0)
    assert lr_factor(10, 100, schedule) == pytest.approx(1.0)
    assert lr_factor(55, 100, schedule) == pytest.approx(0.55)
    assert lr_factor(100, 100, schedule) == pytest.approx(0.1)
    assert lr_factor(50, 100, ScheduleSection(decay="constant")) == 1.0


def test_parameter_groups_skip_frozen_and_no_decay_params():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)  # frozen: in no group
    decay, no_decay = parameter_groups(model, OptimSection(weight_decay=0.2))
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # two biases, the norm's weight and bias


def test_latest_checkpoint_ignores_partial_writes(tmp_path):
    run_dir = str(tmp_path / "run")
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    saver = ckpt.Checkpointer(run_dir, keep=2)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        saver.save(step, model, optimizer, {"step": step})
    (tmp_path / "run" / "checkpoints" / "step_00000009.tmp").mkdir()  # a save that never committed
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]
    assert ckpt.read_model_state(run_dir)["weight"].eq(3).all()


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_interrupted_then_resumed_run_matches_uninterrupted(tiny_recipe, runs_root, test_plugin):
    assert main(["run", str(tiny_recipe), *test_plugin]) == 0
    (reference,) = run_ids(runs_root)

    code = main(["run", str(tiny_recipe), *test_plugin, "objectives.contrastive.interrupt_after_step=2"])
    assert code == 130  # Ctrl-C: checkpoint written, clean exit
    interrupted = [r for r in run_ids(runs_root) if r != reference][0]
    assert status_of(runs_root, interrupted)["status"] == "interrupted"
    assert losses(runs_root, interrupted).keys() == {1, 2}

    assert (
        main(
            [
                "run",
                str(tiny_recipe),
                *test_plugin,
                "objectives.contrastive.interrupt_after_step=2",
                "--resume",
            ]
        )
        == 0
    )
    assert len(run_ids(runs_root)) == 2  # same run id and directory, not a new run
    resumed, uninterrupted = losses(runs_root, interrupted), losses(runs_root, reference)
    assert resumed.keys() == uninterrupted.keys() == set(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step
    assert status_of(runs_root, interrupted)["status"] == "completed"


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_recipe, runs_root, test_plugin, capsys):
    code = main(
        [
            "run",
            str(tiny_recipe),
            *test_plugin,
            "objectives.contrastive.nan_from_step=4",
            "train.checkpoint_every=2",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 5" in err and "last good checkpoint" in err and "Traceback" not in err
    (run_id,) = run_ids(runs_root)
    run = status_of(runs_root, run_id)
    assert run["status"] == "failed" and "non-finite" in run["reason"]
    assert [s for s, _ in ckpt.list_checkpoints(run["run_dir"])] == [2, 4]


@pytest.mark.slow
def test_non_finite_loss_between_log_steps_stops_before_the_next_checkpoint(
    tiny_recipe, runs_root, test_plugin, capsys
):
    # The flag stays on the device between log steps; the checkpoint at step 6 reads it first.
    overrides = ["objectives.contrastive.nan_from_step=3", "train.log_every=100"]
    assert main(["run", str(tiny_recipe), *test_plugin, *overrides]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 4 (at step 6:" in err
    (run_id,) = run_ids(runs_root)
    run = status_of(runs_root, run_id)
    assert run["status"] == "failed"
    assert [s for s, _ in ckpt.list_checkpoints(run["run_dir"])] == [3]


@pytest.mark.slow
def test_two_ranks_train_one_run(tiny_recipe, runs_root):
    assert main(["run", str(tiny_recipe), "launch.nproc=2", "train.steps=3"]) == 0
    (run_id,) = run_ids(runs_root)
    run = status_of(runs_root, run_id)
    assert run["status"] == "completed" and run["world_size"] == 2
    assert sorted(losses(runs_root, run_id)) == [1, 2, 3]  # logged once per step, by rank 0


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_cleanly(tiny_recipe, runs_root):
    cmd = [
        sys.executable,
        "-m",
        "vlforge.cli",
        "run",
        str(tiny_recipe),
        "train.steps=100000",
        "train.checkpoint_every=1",
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(runs_root.glob("*/*/checkpoints/step_????????/manifest.json")) and time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(process.stderr.read())
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    (run_dir,) = runs_root.glob("tests/*")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert ckpt.latest_checkpoint(str(run_dir)) is not None


@pytest.mark.slow
def test_evaluating_does_not_change_the_training_curve(tiny_recipe, runs_root):
    assert main(["run", str(tiny_recipe), "train.eval_every=0"]) == 0
    assert main(["run", str(tiny_recipe), "train.eval_every=2"]) == 0
    without, with_evals = (losses(runs_root, run_id) for run_id in run_ids(runs_root))
    assert without == with_evals
