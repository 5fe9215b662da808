"""DDP vs FSDP on 2 CPU gloo ranks, every tiny recipe: median step time and per-rank peak RSS.

Each (recipe, mode) runs in a fresh pair of processes, so a rank's peak RSS
(``ru_maxrss``) is that mode's alone. fp32, batch 8, ``--steps`` timed steps after 2.

    python bench/ddp_vs_fsdp.py [--steps 10] [--recipes quickstart albef_tiny]

Writes bench/results/ddp_vs_fsdp.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from record import record  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("quickstart", "flip_tiny", "albef_tiny", "flamingo_tiny")
WARMUP = 2


def rank_main(rank: int, recipe: str, mode: str, steps: int, port: int, out: str) -> None:
    from vlforge.launch.local import set_rank_environment

    set_rank_environment(rank, 2, port)
    torch.set_num_threads(1)
    from vlforge.engine import Trainer
    from vlforge.launch.worker import init_process_group
    from vlforge.recipe import load_recipe

    init_process_group(timeout_s=300)
    overrides = ["evaluators={}", "train.progress=false", "train.precision=fp32", "train.batch_size=8"]
    recipe_, plugins = load_recipe(
        str(ROOT / "recipes" / f"{recipe}.toml"), [*overrides, f"train.parallel={mode}"], ()
    )
    trainer = Trainer(recipe_, plugins, f"{out}/run")
    times = []
    for _ in range(WARMUP + steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(f"{out}/rank{rank}.json").write_text(
        json.dumps({"step_s": statistics.median(times[WARMUP:]), "peak_rss_mb": peak_mb})
    )
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    args = parser.parse_args()
    from tqdm.auto import tqdm

    from vlforge.launch.local import free_port

    results: dict[str, dict[str, dict]] = {}
    for recipe in tqdm(args.recipes, desc="recipes"):
        for mode in ("ddp", "fsdp"):
            with tempfile.TemporaryDirectory() as out:
                mp.spawn(rank_main, args=(recipe, mode, args.steps, free_port(), out), nprocs=2, join=True)
                ranks = [json.loads(Path(f"{out}/rank{r}.json").read_text()) for r in range(2)]
            figures = {
                "step_s": max(r["step_s"] for r in ranks),
                "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks],
            }
            results.setdefault(recipe, {})[mode] = figures
            print(recipe, mode, json.dumps(figures), flush=True)
    figures = {
        "device": "cpu, 2 gloo ranks",
        "torch": torch.__version__,
        "steps": args.steps,
        "results": results,
    }
    print(f"wrote {record('ddp_vs_fsdp', figures)}")


if __name__ == "__main__":
    main()
