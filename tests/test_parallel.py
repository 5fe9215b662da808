"""Scale paths on CPU: collective placement, sync-free steps, rank failures, DDP vs FSDP (real gloo ranks)."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from vlforge.cli import main
from vlforge.distributed import CollectiveDeviceError, backend_devices, check_placement, process_group_backend
from vlforge.launch.local import free_port

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ("quickstart", "flip_tiny", "albef_tiny", "flamingo_tiny")

# --------------------------------------------------------------------------- placement


def test_backend_config_names_the_devices_each_backend_serves():
    assert process_group_backend(cuda=True) == "cuda:nccl,cpu:gloo"
    assert process_group_backend(cuda=False) == "gloo"
    assert backend_devices("cuda:nccl,cpu:gloo") == {"cuda": "nccl", "cpu": "gloo"}
    assert backend_devices("nccl") == {"cuda": "nccl"}
    assert set(backend_devices("cpu:gloo,cuda:gloo")) == {"cpu", "cuda"}


def test_a_cpu_tensor_for_an_nccl_only_group_is_refused_by_name():
    with pytest.raises(CollectiveDeviceError, match="no backend for device type cpu"):
        check_placement(torch.zeros(2), "cuda:nccl")
    check_placement(torch.zeros(2), "cuda:nccl,cpu:gloo")  # the group vlforge creates on GPUs


# --------------------------------------------------------------------------- no host sync

SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), bool(), float() of a tensor
    torch.ops.aten.nonzero.default,  # boolean indexing, torch.nonzero
    torch.ops.aten.masked_select.default,
    torch.ops.aten.is_nonzero.default,
}


class SyncRecorder(TorchDispatchMode):
    """Records every op that needs a tensor's value on the host (a device sync on GPUs).

    The optimizer is left out: on CPU AdamW keeps its step count in a host tensor
    (fused AdamW on CUDA keeps it on the device).
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            import traceback

            stack = traceback.extract_stack()
            if not any("torch/optim/" in frame.filename for frame in stack):
                origin = [f for f in stack if "torch/" not in f.filename and __file__ != f.filename]
                self.syncs.append(f"{func} at {origin[-1].filename}:{origin[-1].lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_a_step_that_does_not_log_never_syncs_host_and_device(name, tmp_path):
    from vlforge.engine import Trainer
    from vlforge.recipe import load_recipe

    overrides = ["evaluators={}", "train.batch_size=8", "train.log_every=1000", "train.progress=false"]
    recipe, plugins = load_recipe(str(RECIPES / f"{name}.toml"), overrides, ())
    trainer = Trainer(recipe, plugins, str(tmp_path))
    next_batch = trainer.stream.next

    def load_outside_the_recorder():  # data loading and collation are host work
        with _disable_current_modes():
            return next_batch()

    trainer.stream.next = load_outside_the_recorder
    trainer.train_step()  # the first step may build lazily
    recorder = SyncRecorder()
    with recorder:
        trainer.train_step()
        trainer.train_step()
    assert recorder.syncs == []


# --------------------------------------------------------------------------- failing ranks

FAILING_PLUGIN = """
import time
import torch
from vlforge.hookspecs import hookimpl
from vlforge.registry import ComponentConfig

class Config(ComponentConfig):
    fail_rank: int = -1
    fail_at_step: int = 2
    stamp: str = ""
    direct_collective: bool = False

def build(config, ctx):
    from torch import nn
    from vlforge_plugins.clip import InfoNCEConfig, build_infonce

    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build_infonce(InfoNCEConfig(), ctx)

        def forward(self, step):
            if config.direct_collective:
                torch.distributed.all_reduce(torch.zeros(1))  # bypasses vlforge.distributed
            if ctx.rank == config.fail_rank and step.progress.step == config.fail_at_step:
                with open(config.stamp, "w") as file:
                    file.write(str(time.time()))
                raise ValueError(f"bad caption in shard 7 on rank {ctx.rank}")
            return self.inner(step)

    return Failing()

@hookimpl
def vlforge_register_components(registry):
    registry.add("objective", "test.failing_clip", config=Config, factory=build)
"""


@pytest.fixture
def failing_plugin(install_plugin, monkeypatch) -> list[str]:
    monkeypatch.setenv("VLFORGE_CHECK_COLLECTIVES", "1")
    return [
        install_plugin("failing_test_plugin", FAILING_PLUGIN),
        'objectives.contrastive.type="test.failing_clip"',
    ]


@pytest.mark.slow
def test_one_rank_raising_stops_every_rank_within_seconds(
    tiny_recipe, runs_root, failing_plugin, tmp_path, capsys
):
    stamp = tmp_path / "raised_at"
    overrides = [
        "launch.nproc=2",
        "launch.collective_timeout_s=600",  # a hang would last ten minutes
        "objectives.contrastive.fail_rank=1",
        f"objectives.contrastive.stamp='{stamp}'",
        "evaluators={}",
    ]
    started = time.time()
    assert main(["run", str(tiny_recipe), *failing_plugin, *overrides]) == 1
    raised_at = float(stamp.read_text())
    (status,) = runs_root.glob("*/*/status.json")
    closed_after = status.stat().st_mtime - raised_at  # rank 0 stopped and closed the run
    print(
        f"rank 0 closed the run {closed_after:.1f} s after rank 1 raised, "
        f"all ranks done after {time.time() - raised_at:.1f} s"
    )
    assert closed_after < 15, closed_after
    assert time.time() - started < 120  # not the 600 s collective timeout
    err = capsys.readouterr().err
    assert "bad caption in shard 7 on rank 1" in err
    record = json.loads(status.read_text())
    assert record["status"] == "failed" and "rank 1: ValueError: bad caption in shard 7" in record["reason"]


@pytest.mark.slow
def test_a_collective_that_bypasses_the_helper_fails_the_run(tiny_recipe, runs_root, failing_plugin, capsys):
    overrides = ["launch.nproc=2", "objectives.contrastive.direct_collective=true", "evaluators={}"]
    assert main(["run", str(tiny_recipe), *failing_plugin, *overrides]) == 1
    assert "calls torch.distributed.all_reduce directly" in capsys.readouterr().err


# --------------------------------------------------------------------------- DDP vs FSDP

COMMON = ["evaluators={}", "train.progress=false", "train.precision=fp32", "train.batch_size=8"]
CASES = {name: [f"recipes/{name}.toml", *COMMON] for name in TINY}
# fp32, same data and seeds: FSDP's reduce-scatter and DDP's all-reduce add the same gradients in
# another order, so losses differ by float32 rounding (measured: at most 9.5e-7 absolute, 1.1e-7
# relative over 20 steps). 1e-5 relative leaves 100x for drift and still catches a wrong
# average, a missed shard or an unsynchronised 0-d parameter (>= 1e-3 within a few steps).
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ddp_and_fsdp_losses(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("parallel")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(Path(__file__).parent))  # spawned ranks import the worker by name
        worker = importlib.import_module("parallel_worker")
        mp.spawn(worker.run, args=(2, free_port(), str(out), CASES), nprocs=2, join=True)
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_rank_fsdp_follows_the_ddp_loss_curve(name, ddp_and_fsdp_losses):
    ddp, fsdp = ddp_and_fsdp_losses[f"{name}/ddp"], ddp_and_fsdp_losses[f"{name}/fsdp"]
    assert len(ddp["losses"]) == len(fsdp["losses"]) == 20
    diffs = [abs(a - b) for a, b in zip(ddp["losses"], fsdp["losses"])]
    print(f"{name}: per-step |DDP - FSDP| max {max(diffs):.2e}: {' '.join(f'{d:.1e}' for d in diffs)}")
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=RELATIVE_TOLERANCE)
    assert ddp["losses"][0] != ddp["losses"][-1]  # it trained
    flamingo = name == "flamingo_tiny"  # its embedding-row gradient mask, on local shards under FSDP
    assert ddp["frozen_row_change"] == fsdp["frozen_row_change"] == (0.0 if flamingo else None)


@pytest.mark.slow
def test_frozen_weights_are_stored_in_bf16_when_asked(tmp_path):
    from vlforge.engine import Trainer
    from vlforge.recipe import load_recipe

    overrides = ["evaluators={}", "train.batch_size=8", "train.progress=false", "train.frozen_dtype=bf16"]
    path = str(RECIPES / "flamingo_tiny.toml")
    recipe, plugins = load_recipe(path, [*overrides, "train.precision=fp32"], ())
    with pytest.raises(ValueError, match="frozen_dtype = 'bf16' needs bf16 autocast"):
        Trainer(recipe, plugins, str(tmp_path))
    recipe, plugins = load_recipe(path, [*overrides, "train.precision=bf16"], ())
    trainer = Trainer(recipe, plugins, str(tmp_path))
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad and p.ndim >= 2]
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in trained)  # the optimizer's master weights stay fp32
    assert torch.isfinite(trainer.train_step()["loss"])
