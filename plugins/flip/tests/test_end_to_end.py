"""FLIP through ``vlforge run``: a tiny masked run learns and switches to unmasked tuning on time;
an unmasked-tuning run starts from the pretrained run's weights (``model.init_from``)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from vlforge import checkpoint as ckpt
from vlforge.cli import main
from vlforge.errors import UserError
from vlforge.results.queries import query

REPO = Path(__file__).resolve().parents[3]

# recipes/flip_tiny.toml at test size: N = 16 patches (8 kept), one block per tower, batch 16.
FAST_FLIP = f"""
extends = "{REPO / "recipes" / "flip_tiny.toml"}"
name = "flip_test"
experiment = "tests"

[model.vision]
img_size = 16
width = 32
depth = 1
heads = 2
embed_dim = 32

[model.text]
embed_dim = 32

[model.text.config]  # merged into flip_tiny's text config
hidden_size = 32
num_hidden_layers = 1
intermediate_size = 64

[masking]
unmasked_from_step = 60

[data]
train_size = 2048
val_size = 32
test_size = 32

[optim]
lr = 6e-2  # per 256: 3.75e-3 at batch 16

[schedule]
warmup_steps = 5

[train]
steps = 80
batch_size = 16
log_every = 1
eval_every = 0
checkpoint_every = 0
progress = false
"""


def metric(root: Path, run_id: str, name: str) -> dict[int, float]:
    sql = f"SELECT step, value FROM metrics WHERE run_id = '{run_id}' AND name = '{name}' ORDER BY step"
    return {row["step"]: row["value"] for row in json.loads(query(str(root), sql, "json"))}


def run_dir(root: Path, run_id: str) -> str:
    sql = f"SELECT run_dir FROM runs WHERE run_id = '{run_id}'"
    return json.loads(query(str(root), sql, "json"))[0]["run_dir"]


def only_new_run(root: Path, known: set[str]) -> str:
    ids = {row["run_id"] for row in json.loads(query(str(root), "SELECT run_id FROM runs", "json"))}
    (new,) = ids - known
    return new


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path, str]:
    """(recipe, runs root, run id) of one finished 80-step masked run."""
    folder = tmp_path_factory.mktemp("flip_e2e")
    recipe = folder / "flip_test.toml"
    recipe.write_text(textwrap.dedent(FAST_FLIP))
    root = folder / "runs"
    assert main(["run", str(recipe), "--runs-root", str(root)]) == 0
    return recipe, root, only_new_run(root, set())


@pytest.mark.slow
def test_masked_run_learns(pretrained):
    _, root, run_id = pretrained
    losses = list(metric(root, run_id, "train/loss").values())
    assert len(losses) == 80
    assert losses[0] == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=0.05)  # chance: ln B
    # Contrastive training sits at ln B for ~40 steps here, then falls (to ≈2.48 over the last 10).
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.15


@pytest.mark.slow
def test_unmasked_tuning_starts_at_the_configured_step(pretrained):
    _, root, run_id = pretrained
    ratios = metric(root, run_id, "flip/mask_ratio")  # logged after step s ran, as s + 1
    assert {ratios[s] for s in range(1, 61)} == {0.5}
    assert {ratios[s] for s in range(61, 81)} == {0.0}


@pytest.mark.slow
def test_tuning_run_starts_from_the_pretrained_weights(pretrained):
    recipe, root, run_id = pretrained
    source = run_dir(root, run_id)
    overrides = [f'model.init_from="{source}"', "masking.ratio=0.0", "optim.lr=0.0", "train.steps=1"]
    assert main(["run", str(recipe), *overrides, "--runs-root", str(root)]) == 0
    tuned = only_new_run(root, {run_id})
    assert set(metric(root, tuned, "flip/mask_ratio").values()) == {0.0}
    before = ckpt.read_model_state(source)
    after = ckpt.read_model_state(run_dir(root, tuned))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)  # lr 0: loaded, unchanged


def test_init_from_names_a_missing_or_unfitting_source(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in"):
        ckpt.load_model_weights(torch.nn.Linear(2, 2), str(tmp_path / "no-such-run"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a legacy single-file checkpoint
    torch.save({"model": torch.nn.Linear(2, 3).state_dict()}, tmp_path / "run/checkpoints/step_00000001.pt")
    with pytest.raises(UserError, match="does not fit this model"):
        ckpt.load_model_weights(torch.nn.Linear(2, 2), str(tmp_path / "run"))
