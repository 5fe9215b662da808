"""albef end to end: the recipes build and run through the CLI; FLIP masking composes with ALBEF."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from vlforge import checkpoint as ckpt
from vlforge.cli import main
from vlforge.components import BuildContext
from vlforge.model import Progress, Step, build_component, build_model
from vlforge.plugins import load_plugins
from vlforge.recipe import load_recipe
from vlforge.results.queries import query

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
# The tiny recipe, shrunk further: 16 patches, 8 pairs per step, a queue of 2 steps, 16 held-out items.
SMALL = [
    "model.vision.patch_size=8",
    "train.steps=3",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.progress=false",
    "objectives.itc.queue_size=16",
    "data.train_size=64",
    "data.val_size=16",
    "evaluators.retrieval.k=4",
]


def flip_registered() -> bool:
    return "flip.random" in load_plugins().registry.names("masking")


@pytest.fixture
def runs_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("VLFORGE_RUNS", str(root))
    return root


def run_row(root: Path) -> dict:
    (row,) = json.loads(query(str(root), "SELECT run_id, run_dir, status FROM runs", "json"))
    return row


def metric_names(root: Path, table: str, run_id: str) -> set[str]:
    column = "name" if table == "metrics" else "metric"
    rows = json.loads(
        query(str(root), f"SELECT DISTINCT {column} FROM {table} WHERE run_id = '{run_id}'", "json")
    )
    return {row[column] for row in rows}


@pytest.mark.slow
def test_tiny_albef_trains_evaluates_and_checkpoints_teacher_and_queues(runs_root):
    assert main(["run", str(RECIPES / "albef_tiny.toml"), *SMALL]) == 0
    run = run_row(runs_root)
    assert run["status"] == "completed"
    metrics = metric_names(runs_root, "metrics", run["run_id"])
    assert {
        "train/itc",
        "train/itm",
        "train/mlm",
        "albef/itm_accuracy",
        "albef/temperature",
        "albef/alpha",
    } <= metrics
    evals = metric_names(runs_root, "evals", run["run_id"])
    assert {"i2t_r1", "t2i_r1", "itm_i2t_r1", "itm_t2i_r10", "i2t_chance_r1"} <= evals

    state = ckpt.read_model_state(run["run_dir"])
    assert int(state["objectives.itc.queue_ptr"]) == (3 * 8) % 16
    online, momentum = state["vision.proj.weight"], state["teacher.parts.vision.proj.weight"]
    assert not torch.equal(online, momentum), "the teacher follows the student with a lag"


def test_albef_4m_dry_run_counts_86m_vision_and_124m_text_plus_fusion(capsys):
    assert main(["run", str(RECIPES / "albef_4m.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    counts = {name: float(m) for name, m in re.findall(r"^\s+(\w+)\s+([\d.]+)M parameters", out, re.M)}
    assert counts["vision"] == pytest.approx(86.0, abs=0.5)
    assert counts["text"] + counts["fusion"] == pytest.approx(124.0, abs=0.5)
    assert counts["teacher"] == pytest.approx(counts["vision"] + counts["text"] + counts["fusion"], abs=0.02)
    assert "64 per rank" in out


@pytest.mark.skipif(not flip_registered(), reason="the flip plugin (flip.random) is not registered")
def test_flip_masked_student_and_unmasked_teacher():
    recipe, plugins = load_recipe(RECIPES / "albef_flip_masked.toml", SMALL)
    ctx = BuildContext(recipe)
    model = build_model(recipe, plugins, ctx)
    data = build_component(plugins, "dataset", recipe.data, ctx)
    train = data.dataset("train")
    batch = data.collate([train[i] for i in range(8)])
    loss, terms = model(batch, Progress())
    assert torch.isfinite(loss) and terms.keys() == {"itc", "itm", "mlm"}
    # 32-px images in 8-px patches: 16 patches + CLS; the student keeps half of the patches.
    step = Step(model, batch, Progress())
    assert step.image.tokens.shape[1] == 1 + 8
    assert model.teacher.image(step).tokens.shape[1] == 1 + 16


@pytest.mark.slow
@pytest.mark.skipif(not flip_registered(), reason="the flip plugin (flip.random) is not registered")
def test_flip_masked_albef_recipe_runs(runs_root):
    assert main(["validate", str(RECIPES / "albef_flip_masked.toml")]) == 0
    assert main(["run", str(RECIPES / "albef_flip_masked.toml"), *SMALL, "evaluators={}"]) == 0
    assert run_row(runs_root)["status"] == "completed"
