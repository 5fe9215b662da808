"""Worker for the 2-process DDP-vs-FSDP test: imported by name in spawned children, so not a test module.

Every rank joins one gloo group (the launcher's ``init_process_group``, with the
collective guard on), then trains each case for ``STEPS`` steps under DDP and
under FSDP and rank 0 writes the rank-averaged loss of every step to JSON.
"""

from __future__ import annotations

import json
import os

import torch

STEPS = 20


def frozen_row_change(trainer) -> float | None:
    """Flamingo: how far the embedding rows that must not train moved (0 when the row mask works);
    None for a model without such rows."""
    fusion = trainer.model.fusion
    if not hasattr(fusion, "frozen_rows"):
        return None
    weight = fusion.lm.get_input_embeddings().weight
    full = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
    start = trainer.initial_embedding
    return float((full.detach() - start)[fusion.frozen_rows].abs().max())


def train_losses(recipe_path: str, overrides: list[str], run_dir: str) -> dict[str, object]:
    from vlforge import distributed as dist
    from vlforge.engine import Trainer
    from vlforge.recipe import load_recipe

    recipe, plugins = load_recipe(recipe_path, overrides, ())
    trainer = Trainer(recipe, plugins, run_dir)
    fusion = trainer.model.fusion
    if hasattr(fusion, "frozen_rows"):
        weight = fusion.lm.get_input_embeddings().weight
        full = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        trainer.initial_embedding = full.detach().clone()
    losses = []
    for _ in range(STEPS):
        sums = trainer.train_step()
        losses.append(float(dist.all_reduce_mean(sums["loss"].reshape(1))))
    return {"losses": losses, "frozen_row_change": frozen_row_change(trainer)}


def run(rank: int, world: int, port: int, out_dir: str, cases: dict[str, list[str]]) -> None:
    from vlforge import distributed as dist
    from vlforge.launch.local import set_rank_environment
    from vlforge.launch.worker import init_process_group

    set_rank_environment(rank, world, port)
    os.environ["VLFORGE_CHECK_COLLECTIVES"] = "1"
    torch.set_num_threads(1)

    init_process_group(timeout_s=120)
    results: dict[str, dict[str, object]] = {}
    for name, overrides in cases.items():
        path, *rest = overrides
        for mode in ("ddp", "fsdp"):
            run_dir = f"{out_dir}/{name}-{mode}"
            results[f"{name}/{mode}"] = train_losses(path, [*rest, f"train.parallel={mode}"], run_dir)
    if rank == 0:
        with open(f"{out_dir}/losses.json", "w") as file:
            json.dump(results, file)
    dist.leave_group()
