"""Resharding: a checkpoint saved by 2 FSDP2 ranks loads at world 1 (plain) and world 4 (FSDP2).

Real gloo processes. The model is sharded with ``fully_shard`` directly in the worker, so this
holds whatever the engine's wrapping does. After loading, the full model and optimizer state
(gathered) equal what was saved, and each FSDP rank read only about its share of the tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optim_state}


def train_two_steps(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(6, 8, generator=generator)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def worker(rank: int, world: int, port: int, run_dir: str, mode: str, report: str) -> None:
    import torch.distributed as dist

    from vlforge.checkpoint import Checkpointer, latest_checkpoint, store
    from vlforge.distributed import leave_group

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = build(seed=0 if mode == "save" else 99)  # the loaded model starts different
    if world > 1:
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    saver = Checkpointer(run_dir, keep=2)
    if mode == "save":
        train_two_steps(model, optimizer)
        saver.save(2, model, optimizer, {"step": 2} if rank == 0 else None)
        expected = full_state(model, optimizer)
        if rank == 0:
            torch.save(expected, f"{run_dir}/expected.pt")
    else:
        elements = []
        plain_reader = store.storage_reader

        def counting_reader(url):  # records how many tensor elements this rank asks to read
            reader = plain_reader(url)
            read_data = reader.read_data

            def read(plan, planner):
                elements.append(sum(math.prod(item.lengths) for item in plan.items if item.lengths))
                return read_data(plan, planner)

            reader.read_data = read
            return reader

        store.storage_reader = counting_reader
        train_state = saver.load(latest_checkpoint(run_dir), model, optimizer)
        loaded = full_state(model, optimizer)
        if rank == 0:
            torch.save({"loaded": loaded, "train_state": train_state}, report)
        torch.save(sum(elements), f"{report}.{rank}.elements")
    leave_group()


def run(world: int, run_dir, mode: str, report: str = "") -> None:
    """Spawn ``world`` ranks of :func:`worker`: one thread each, importing this module by name.

    The settings last only for the spawn: OMP_NUM_THREADS left in the suite's environment would
    give every later subprocess (CLI runs, Slurm jobs) other float sums than the pytest process.
    """
    from vlforge.launch.local import free_port

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.syspath_prepend(str(REPO))
        mp.spawn(worker, args=(world, free_port(), str(run_dir), mode, report), nprocs=world, join=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with one checkpoint saved by two FSDP2 ranks, and the state they saved."""
    run_dir = tmp_path_factory.mktemp("reshard") / "run"
    run(2, run_dir, "save")
    return run_dir, torch.load(run_dir / "expected.pt", weights_only=False)


def assert_equal_states(loaded: dict, expected: dict) -> None:
    assert loaded["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    for key, state in expected["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(loaded["optimizer"]["state"][key][name]), torch.as_tensor(value)
            )
    assert [g["lr"] for g in loaded["optimizer"]["param_groups"]] == [
        g["lr"] for g in expected["optimizer"]["param_groups"]
    ]


@pytest.mark.parametrize("world", [1, 4])
def test_fsdp_checkpoint_of_two_ranks_loads_at_another_world_size(saved, tmp_path, world):
    run_dir, expected = saved
    report = str(tmp_path / "report.pt")
    if world == 1:
        worker(0, 1, 0, str(run_dir), "load", report)
    else:
        run(world, run_dir, "load", report)
    got = torch.load(report, weights_only=False)
    assert got["train_state"] == {"step": 2}
    assert_equal_states(got["loaded"], expected)
    total = sum(v.numel() for v in expected["model"].values()) * 3  # weights + exp_avg + exp_avg_sq
    per_rank = [torch.load(f"{report}.{r}.elements") for r in range(world)]
    for elements in per_rank:  # each rank reads its share (plus one step counter per tensor)
        assert elements <= total / world + len(expected["model"]) * world, per_rank
