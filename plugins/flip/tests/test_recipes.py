"""The FLIP recipes: all validate with FLIP's settings; the ViT-H dry run plans without allocating."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlforge.components import BuildContext
from vlforge.model import build_model
from vlforge.recipe import load_recipe

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "recipes"


@pytest.mark.parametrize(
    "name", ["flip_tiny", "flip_vitl16_laion400m", "flip_vith_laion2b", "flip_unmasked_tuning"]
)
def test_recipe_validates_with_flips_settings(name):
    recipe, _ = load_recipe(RECIPES / f"{name}.toml")
    vision = recipe.model.vision.config
    assert (vision.pool, vision.pos_embed) == ("avg", "sincos")
    assert vision.timm_kwargs == {"pool_include_prefix": True}
    assert recipe.optim.lr_scaling == "per256"
    assert recipe.optim.betas == (0.9, 0.95) and recipe.optim.weight_decay == 0.2
    assert {"bias", "norm", "cls_token", "pos_embed"} <= set(recipe.optim.no_decay)
    assert recipe.schedule.decay == "cosine" and recipe.schedule.warmup_steps > 0
    assert recipe.masking.type == "flip.random"


def test_tuning_recipe_continues_the_vitl_run_unmasked():
    tuning, _ = load_recipe(RECIPES / "flip_unmasked_tuning.toml")
    base, _ = load_recipe(RECIPES / "flip_vitl16_laion400m.toml")
    assert tuning.model.vision.config == base.model.vision.config  # same architecture: weights fit
    assert tuning.masking.config.ratio == 0.0 and base.masking.config.ratio == 0.5
    assert tuning.model.init_from and base.model.init_from is None
    assert tuning.optim.lr == 4e-8 and tuning.train.steps * tuning.train.batch_size == 124_518_400


def test_full_scale_schedules_follow_the_official_configs():
    """19 steps per virtual ImageNet epoch (1,281,167 // 65,536), as the JAX loop counts them."""
    steps_per_epoch = 1_281_167 // 65_536
    for name, epochs, warmup, base_lr in [
        ("flip_vitl16_laion400m", 10_000, 20, 4e-6),
        ("flip_vith_laion2b", 20_000, 200, 2e-6),
    ]:
        recipe, _ = load_recipe(RECIPES / f"{name}.toml")
        assert recipe.train.batch_size == 65_536 and recipe.train.precision == "bf16"
        assert recipe.train.steps == epochs * steps_per_epoch
        assert recipe.schedule.warmup_steps == warmup * steps_per_epoch
        assert math.isclose(recipe.optim.lr, base_lr)


@pytest.mark.slow
def test_vith_dry_run_prints_the_plan_and_allocates_no_weights(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no sinfo: plan for the recipe's cluster, not this one
    process = subprocess.Popen(
        [sys.executable, "-m", "vlforge.cli", "run", str(RECIPES / "flip_vith_laion2b.toml"), "--dry-run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
    assert os.waitstatus_to_exitcode(status) == 0, out
    vision = next(line for line in out.splitlines() if line.strip().startswith("vision"))
    assert 630 < float(vision.split()[1].rstrip("M")) < 634  # ViT-H/14 + 1280x1024 projection
    assert "world size 512" in out and "128 per rank" in out and "nothing was submitted" in out
    # ~967M fp32 parameters would take 3.9 GB; the imports alone take about 1 GB.
    assert usage.ru_maxrss * 1024 < 2.5e9


def test_flip_objective_starts_at_one_over_007_and_clamps_at_ln_100():
    """The recipes' temperature is clip.infonce's: init ln(1/0.07), clamped after an overshooting step."""
    recipe, plugins = load_recipe(RECIPES / "flip_tiny.toml")
    objective = build_model(recipe, plugins, BuildContext(recipe)).objectives["contrastive"]
    assert objective.logit_scale.exp().item() == pytest.approx(1 / 0.07, abs=1e-5)
    optimizer = torch.optim.SGD([objective.logit_scale], lr=10.0)
    (-objective.logit_scale).backward()  # pushes s up by 10, far past ln 100
    optimizer.step()
    assert objective.logit_scale.item() > math.log(100)
    plugins.register_component(objective, "component:contrastive")
    plugins.call("vlforge_after_optimizer_step", state=None)
    assert objective.logit_scale.item() == pytest.approx(math.log(100), abs=1e-6)
