"""The --dry-run plan: activations against a real forward, static memory exact, full-scale recipes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from vlforge.components import BuildContext
from vlforge.data.stream import make_stream
from vlforge.launch.profiles import ProfileError, load_profile
from vlforge.model import Progress, build_component, build_model
from vlforge.plan import SavedTensorBytes, make_plan
from vlforge.recipe import load_recipe

from .conftest import REPO

# A small micro-batch keeps the real forwards quick; shapes, not sizes, are what is tested.
SMALL = {
    "flip_tiny": ["train.batch_size=16"],
    "albef_tiny": ["train.batch_size=16"],
    "flamingo_tiny": ["train.batch_size=16"],
}
CHECKPOINTED = {
    "flip_tiny": ["model.vision.gradient_checkpointing=true", "model.text.gradient_checkpointing=true"],
    "albef_tiny": [
        "model.vision.gradient_checkpointing=true",
        "model.text.gradient_checkpointing=true",
        "model.fusion.gradient_checkpointing=true",
    ],
    "flamingo_tiny": [
        "model.adapter.gradient_checkpointing=true",
        "model.fusion.gradient_checkpointing=true",
    ],
}


def load(name: str, overrides: list[str]):
    return load_recipe(str(REPO / "recipes" / f"{name}.toml"), [*SMALL[name], *overrides], ())


def planned(recipe, plugins):
    model = build_model(recipe, plugins, BuildContext(recipe, device="meta", meta=True))
    return make_plan(recipe, plugins, model, world=1)


def padded_to(batch: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The real batch zero-padded to the planned (largest) shapes: the plan is the worst case."""
    out = dict(batch)
    for key, shape in shapes.items():
        value = batch[key]
        pad = [p for have, want in zip(reversed(value.shape), reversed(shape)) for p in (0, want - have)]
        out[key] = torch.nn.functional.pad(value, pad)
    return out


def measured_activations(recipe, plugins, plan) -> dict[str, int]:
    """Bytes saved for backward in a real CPU forward of each kind of real micro-batch."""
    torch.manual_seed(0)
    ctx = BuildContext(recipe)
    model = build_model(recipe, plugins, ctx)
    data = build_component(plugins, "dataset", recipe.data, ctx)
    ctx.parts["data"] = data
    stream = make_stream(data, plan.micro_batch, recipe.seed, 0)
    meta = build_model(recipe, plugins, BuildContext(recipe, device="meta", meta=True))
    from vlforge.plan import planned_batches

    shapes = {
        kind: {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        for kind, batch in planned_batches(meta, recipe, plan.micro_batch).items()
    }
    model.train()
    measured = {}
    for _ in shapes:
        batch = stream.next()
        kind = batch.get("dataset", "train")
        batch = padded_to(
            {k: v for k, v in batch.items() if k in shapes[kind]} | {"dataset": kind}, shapes[kind]
        )
        with SavedTensorBytes(model) as saved:
            loss, _ = model(batch, Progress(total_steps=1))
        loss.backward()
        measured[kind] = saved.total
    return measured


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("flip_tiny", ["masking.ratio=0.0"]),
        ("flip_tiny", ["masking.ratio=0.5"]),
        ("flip_tiny", ["masking.ratio=0.75"]),
        ("flip_tiny", ["masking.ratio=0.0", *CHECKPOINTED["flip_tiny"]]),
        ("flip_tiny", ["masking.ratio=0.5", *CHECKPOINTED["flip_tiny"]]),
        ("flip_tiny", ["masking.ratio=0.75", *CHECKPOINTED["flip_tiny"]]),
        ("albef_tiny", []),
        ("albef_tiny", CHECKPOINTED["albef_tiny"]),
        ("flamingo_tiny", []),
        ("flamingo_tiny", CHECKPOINTED["flamingo_tiny"]),
    ],
)
def test_planned_activations_match_a_real_forward(name, overrides):
    recipe, plugins = load(name, overrides)
    plan = planned(recipe, plugins)
    measured = measured_activations(recipe, plugins, plan)
    assert set(measured) == set(plan.activations_by_kind)
    for kind, real in measured.items():
        assert real > 0
        assert abs(plan.activations_by_kind[kind] - real) <= 0.15 * real, (
            kind,
            plan.activations_by_kind,
            measured,
        )


def test_checkpointing_and_masking_change_the_planned_activations():
    base = planned(*load("flip_tiny", ["masking.ratio=0.0"])).activations_by_kind["train"]
    masked = planned(*load("flip_tiny", ["masking.ratio=0.75"])).activations_by_kind["train"]
    checkpointed = planned(*load("flip_tiny", ["masking.ratio=0.0", *CHECKPOINTED["flip_tiny"]]))
    assert masked < 0.6 * base  # a quarter of the patches: the vision tower dominates
    assert checkpointed.activations_by_kind["train"] < 0.5 * base
    assert any(row.name == "recompute (1 unit)" and row.bytes > 0 for row in checkpointed.memory)


@pytest.mark.parametrize("name", ["flip_tiny", "albef_tiny", "flamingo_tiny"])
def test_planned_parameter_gradient_and_optimizer_bytes_are_exact(name, tmp_path):
    from vlforge.engine import Trainer

    recipe, plugins = load(name, ["train.steps=1", "train.progress=false"])
    rows = {row.name: row.bytes for row in planned(recipe, plugins).memory}
    trainer = Trainer(recipe, plugins, str(tmp_path / "run"))
    trainer.train_step()  # AdamW has its state now
    batch = trainer.stream.next()
    loss, _ = trainer.model(batch, trainer.progress)
    loss.backward()
    model = trainer.model
    teacher = {id(p) for p in model.teacher.parameters()} if model.teacher is not None else set()
    params = list(model.parameters())
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    trainable = nbytes(p for p in params if p.requires_grad)
    assert rows["parameters, trainable"] == trainable
    assert rows.get("parameters, frozen", 0) == nbytes(
        p for p in params if not p.requires_grad and id(p) not in teacher
    )
    assert rows.get("parameters, EMA teacher", 0) == nbytes(p for p in params if id(p) in teacher)
    assert rows["gradients"] == nbytes(p.grad for p in params if p.grad is not None)
    state = trainer.state.optimizer.state.values()
    assert rows["AdamW state"] == nbytes(t for s in state for t in s.values() if isinstance(t, torch.Tensor))


def test_planned_bf16_frozen_bytes_are_what_cast_frozen_stores():
    from vlforge.parallel import cast_frozen

    recipe, plugins = load("flamingo_tiny", ["train.frozen_dtype=bf16", "train.precision=bf16"])
    rows = {row.name: row.bytes for row in planned(recipe, plugins).memory}
    model = build_model(recipe, plugins, BuildContext(recipe))
    assert cast_frozen(model, torch.bfloat16) > 0
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16, torch.float32}  # 1-D norms and biases stay fp32
    assert rows["parameters, frozen"] == sum(p.numel() * p.element_size() for p in frozen)


def test_frozen_bf16_leaves_the_ema_teacher_in_fp32():
    from vlforge.parallel import cast_frozen

    recipe, plugins = load("albef_tiny", ["train.frozen_dtype=bf16", "train.precision=bf16"])
    model = build_model(recipe, plugins, BuildContext(recipe))
    cast_frozen(model, torch.bfloat16)
    assert {p.dtype for p in model.teacher.parameters()} == {torch.float32}  # updated every step
    model.teacher.update()  # the EMA lerp towards the fp32 student (it raised on bf16 copies)


FULL_SCALE = ["flip_vith_laion2b", "albef_14m", "flamingo_3b", "flamingo_9b"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SCALE)
def test_full_scale_plans_agree_with_the_recipe_comment(name, tmp_path):
    """The total is the "≈N GB per GPU" the recipe's comment states (what a plan costs in CPU and
    memory is measured by bench/plan_cost.py, not timed here)."""
    command = [sys.executable, "-m", "vlforge.cli", "run", f"recipes/{name}.toml", "--dry-run",
               "--format", "json", "--runs-root", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["fits"] is True
    assert plan["estimate"]["gpu_hours"] > 0
    claim = re.search(r"≈(\d+) GB per GPU", (REPO / "recipes" / f"{name}.toml").read_text())
    assert claim, f"recipes/{name}.toml states no '≈N GB per GPU'"
    assert abs(plan["total_gb"] - int(claim[1])) <= max(2, 0.1 * int(claim[1])), plan["total_gb"]


def profile_file(tmp_path, gpu_memory_gb: float) -> str:
    path = tmp_path / "small.toml"
    path.write_text(
        f'partition = "x"\ngpus_per_node = 1\ngpu_memory_gb = {gpu_memory_gb}\ngpu_peak_tflops = 100\n'
    )
    return str(path)


def test_a_recipe_that_does_not_fit_warns_names_levers_and_is_refused_with_strict(tmp_path):
    recipe = str(REPO / "recipes" / "flip_tiny.toml")
    profile = f'launch.profile="{profile_file(tmp_path, 0.06)}"'
    args = [
        sys.executable,
        "-m",
        "vlforge.cli",
        "run",
        recipe,
        profile,
        "--dry-run",
        "--runs-root",
        str(tmp_path),
    ]
    warned = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert warned.returncode == 0, warned.stderr
    assert "DOES NOT FIT" in warned.stdout and "does not fit" in warned.stderr
    levers = warned.stdout.split("levers that would make it fit")[1]
    assert "gradient_checkpointing = true on every tower" in levers
    assert re.search(r"train\.accum_steps = \d+ \(micro-batch \d+ per GPU\)\s+[\d.]+ GB\s+fits", levers)
    refused = subprocess.run([*args, "--strict"], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    as_json = subprocess.run(
        [*args, "--format", "json", "--strict"], cwd=REPO, capture_output=True, text=True
    )
    data = json.loads(as_json.stdout)
    assert as_json.returncode == 2 and data["fits"] is False
    assert any(lever["fits"] for lever in data["levers"])
    assert data["estimate"]["step_time_s"] == pytest.approx(data["step_flops"] / (100e12 * 0.4))


def test_profile_hardware_keys_are_validated(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('partition = "x"\ngpu_memory_gb = -1\nmfu = 1.5\n')
    with pytest.raises(ProfileError) as error:
        load_profile(bad)
    assert "gpu_memory_gb" in str(error.value) and "mfu" in str(error.value)
    assert load_profile(profile_file(tmp_path, 80)).mfu == 0.4  # the stated default


def test_a_measured_step_time_from_the_index_is_shown_beside_the_estimate(tiny_recipe, runs_root, capsys):
    from vlforge.cli import main

    assert main(["run", str(tiny_recipe), "train.steps=4"]) == 0  # the summary builds the index
    capsys.readouterr()
    assert main(["run", str(tiny_recipe), "--dry-run", "--format", "json"]) == 0
    measured = json.loads(capsys.readouterr().out)["measured"]
    assert measured["runs"] == 1 and measured["samples_per_s"] > 0
    assert measured["step_time_s"] == pytest.approx(16 / measured["samples_per_s"])  # batch 16
    assert main(["run", str(tiny_recipe), "--dry-run", "launch.nproc=2"]) == 0
    assert "measured" not in capsys.readouterr().out  # another world size: no figure to show
