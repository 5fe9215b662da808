"""Same world size: every tiny recipe resumed from a checkpoint equals its uninterrupted run bitwise.

Each recipe is shrunk with overrides so it takes seconds. A plain hook plugin sends SIGINT after
step 2 (the run checkpoints and stops); ``--resume`` then finishes it. Flamingo's checkpoint
leaves out its frozen LM (rebuilt from the recipe), and its resume is bitwise too.
"""

from __future__ import annotations

import pytest

from vlforge import checkpoint as ckpt
from vlforge.checkpoint.store import saved_keys
from vlforge.cli import main

from .conftest import REPO
from .test_engine import losses, run_ids

pytestmark = pytest.mark.slow

INTERRUPT_PLUGIN = """
import os, signal
from vlforge.hookspecs import hookimpl

@hookimpl
def vlforge_after_optimizer_step(state):
    if str(state.step) == os.environ.get("INTERRUPT_AFTER_STEP"):
        os.kill(os.getpid(), signal.SIGINT)
"""

COMMON = ["train.steps=4", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0"]
SHRINK = {
    "quickstart": ["train.batch_size=16", "data.train_size=256", "evaluators={}"],
    "flip_tiny": [
        "train.batch_size=16",
        "data.train_size=256",
        "evaluators={}",
        "masking.unmasked_from_step=3",
    ],
    "albef_tiny": [
        "train.batch_size=8",
        "data.train_size=256",
        "evaluators={}",
        "objectives.itc.queue_size=16",
    ],
    "flamingo_tiny": ["train.batch_size=8", "train.accum_steps=2", "evaluators={}"],
}


@pytest.fixture
def interrupt_plugin(install_plugin) -> str:
    return install_plugin("interrupt_plugin", INTERRUPT_PLUGIN)


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_resumed_tiny_recipe_equals_uninterrupted_run(name, runs_root, interrupt_plugin, monkeypatch):
    args = [str(REPO / "recipes" / f"{name}.toml"), *COMMON, *SHRINK[name], interrupt_plugin]
    args.append("train.progress=false")
    assert main(["run", *args]) == 0
    (reference,) = run_ids(runs_root)
    monkeypatch.setenv("INTERRUPT_AFTER_STEP", "2")
    assert main(["run", *args]) == 130
    (run_id,) = set(run_ids(runs_root)) - {reference}
    run_dir = next(runs_root.glob(f"*/{run_id}"))
    latest = ckpt.latest_checkpoint(str(run_dir))
    excluded = ckpt.read_manifest(latest)["excluded"]
    if name == "flamingo_tiny":  # the frozen LM is not saved; its trainable embedding is
        assert excluded and all(key.startswith("fusion.lm.") for key in excluded)
        assert not set(excluded) & set(saved_keys(latest))
        assert "fusion.lm.transformer.wte.weight" in saved_keys(latest)
    else:
        assert excluded == []
    assert main(["run", *args, "--resume"]) == 0
    assert losses(runs_root, run_id) == losses(runs_root, reference)
    assert sorted(losses(runs_root, run_id)) == [1, 2, 3, 4]
