"""Fine-tuning controls: locked towers with unlocked last blocks, lr multipliers, layer-wise lr decay."""

from __future__ import annotations

import pytest
import torch

from vlforge.checkpoint import read_model_state
from vlforge.cli import main
from vlforge.components import BuildContext
from vlforge.engine import seed_everything
from vlforge.errors import UserError
from vlforge.model import build_model
from vlforge.optim import parameter_groups
from vlforge.recipe import RecipeError, load_recipe


def build(path, overrides=()):
    recipe, plugins = load_recipe(path, overrides)
    seed_everything(recipe.seed)  # as the trainer does: the same initial weights
    return recipe, build_model(recipe, plugins, BuildContext(recipe))


def trainable(model, prefix: str) -> set[str]:
    return {
        n.removeprefix(prefix)
        for n, p in model.named_parameters()
        if n.startswith(prefix) and p.requires_grad
    }


def test_lock_keeps_the_last_blocks_and_head_trainable(tiny_recipe):
    _, model = build(tiny_recipe, ["optim.lock.vision.unlocked_blocks=1"])
    assert trainable(model, "vision.") == {
        *(f"vit.blocks.1.{n}" for n, _ in model.vision.vit.blocks[1].named_parameters()),
        "vit.norm.weight",
        "vit.norm.bias",
        "proj.weight",
    }
    assert all(p.requires_grad for p in model.text.parameters())
    _, model = build(tiny_recipe, ["optim.lock.text.unlocked_blocks=0"])
    assert trainable(model, "text.") == set()  # the whole tower, its projection included
    with pytest.raises(UserError, match="unlocked_blocks = 3, but the part has 2 blocks"):
        build(tiny_recipe, ["optim.lock.vision.unlocked_blocks=3"])


def test_locked_tower_does_not_change_in_training(tiny_recipe, runs_root):
    overrides = [
        "optim.lock.vision.unlocked_blocks=0",
        "train.steps=2",
        "~evaluators",
        "train.checkpoint_every=0",
    ]
    assert main(["run", str(tiny_recipe), *overrides]) == 0
    (run_dir,) = runs_root.glob("tests/*")
    trained = read_model_state(str(run_dir))
    _, initial = build(tiny_recipe, overrides)
    vision = {name: t for name, t in initial.state_dict().items() if name.startswith("vision.")}
    assert vision and all(torch.equal(trained[name], tensor) for name, tensor in vision.items())
    assert not torch.equal(trained["text.proj.weight"], initial.state_dict()["text.proj.weight"])


def group_scale(groups, model, name) -> float:
    param = dict(model.named_parameters())[name]
    (scale,) = [g["lr_scale"] for g in groups if any(p is param for p in g["params"])]
    return scale


def test_lr_multipliers_longest_prefix_wins_and_layer_decay_multiplies(tiny_recipe):
    overrides = [
        'optim.lr_multipliers={vision=0.1, "text.model.embeddings"=0.5}',
        "optim.layer_decay={vision=0.5, text=0.8}",
    ]
    recipe, model = build(tiny_recipe, overrides)
    groups = parameter_groups(model, recipe.optim)
    assert group_scale(groups, model, "vision.vit.patch_embed.proj.weight") == pytest.approx(0.1 * 0.5**3)
    assert group_scale(groups, model, "vision.vit.blocks.0.attn.qkv.weight") == pytest.approx(0.1 * 0.5**2)
    assert group_scale(groups, model, "vision.vit.blocks.1.mlp.fc1.weight") == pytest.approx(0.1 * 0.5)
    assert group_scale(groups, model, "vision.proj.weight") == pytest.approx(0.1)
    embeddings = "text.model.embeddings.word_embeddings.weight"
    assert group_scale(groups, model, embeddings) == pytest.approx(0.5 * 0.8**3)
    assert group_scale(groups, model, "text.model.encoder.layer.1.output.dense.weight") == pytest.approx(0.8)
    assert group_scale(groups, model, "objectives.contrastive.logit_scale") == 1.0
    assert groups[0]["lr_scale"] == 1.0 and groups[1]["lr_scale"] == 1.0  # train/lr logs the base lr
    counted = sum(len(g["params"]) for g in groups)
    assert counted == sum(1 for p in model.parameters() if p.requires_grad)


def test_trainer_sets_each_group_lr(tiny_recipe, runs_root):
    from vlforge.engine import Trainer

    recipe, plugins = load_recipe(tiny_recipe, ["optim.lr_multipliers={vision=0.1}", "optim.lr=1e-3"])
    trainer = Trainer(recipe, plugins, str(runs_root / "run"))
    lrs = {round(g["initial_lr"] / 1e-3, 6) for g in trainer.state.optimizer.param_groups}
    assert lrs == {1.0, 0.1}


def test_fine_tuning_keys_are_validated(tiny_recipe, capsys):
    assert main(["run", str(tiny_recipe), "--dry-run", "optim.lr_multipliers={visoin=0.1}"]) == 2
    assert (
        "'visoin' is the start of no parameter name (parts: vision, text, objectives)"
        in capsys.readouterr().err
    )
    assert main(["run", str(tiny_recipe), "--dry-run", "optim.lock.fusion.unlocked_blocks=1"]) == 2
    assert "optim.lock.fusion: model has no part 'fusion'" in capsys.readouterr().err
    with pytest.raises(
        RecipeError, match="optim.layer_decay.vision: Input should be less than or equal to 1"
    ):
        load_recipe(tiny_recipe, ["optim.layer_decay={vision=1.5}"])
    with pytest.raises(RecipeError, match="optim.lock.vision.unlocked_block: unknown key"):
        load_recipe(tiny_recipe, ["optim.lock.vision.unlocked_block=1"])
    assert main(["run", str(tiny_recipe), "--dry-run", "optim.lock.vision.unlocked_blocks=0"]) == 0
    assert "(0.00M trainable)" in capsys.readouterr().out
