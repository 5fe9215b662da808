"""Every tiny recipe for a few steps per mode (eager, FSDP world 1, compile), bf16: step time, peak memory.

The python part of ``bench/gpu_smoke.sh``. Each mode builds the recipe's ``Trainer`` in this
process (a one-rank process group, so FSDP really shards over one rank) and times
``steps`` optimizer steps after ``warmup`` ones. Figures per recipe and mode:
``step_s`` (median), ``samples_per_s``, ``max_memory_allocated_mb`` (CUDA only) and, for
compile, ``first_step_s`` (compilation included) and ``graph_breaks`` (torch._dynamo counters).

    python bench/tiny_modes.py                     # on a GPU: bf16, 20 steps
    python bench/tiny_modes.py --cpu --steps 2     # CPU dry pass of the same code (fp32)

Writes bench/results/tiny_modes[_cpu].json with the device name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from record import record  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("quickstart", "flip_tiny", "albef_tiny", "flamingo_tiny")
MODES = {"ddp": [], "fsdp": ["train.parallel=fsdp"], "compile": ["train.compile=true"]}


def one_rank_group(cuda: bool) -> None:
    import torch.distributed as dist

    from vlforge.distributed import process_group_backend
    from vlforge.launch.local import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group(process_group_backend(cuda), rank=0, world_size=1)


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def measure(name: str, mode: str, args: argparse.Namespace, run_dir: str) -> dict[str, float]:
    from torch._dynamo.utils import counters

    from vlforge.engine import Trainer
    from vlforge.recipe import load_recipe

    precision = "fp32" if args.cpu else "bf16"
    overrides = [
        "evaluators={}",
        "train.progress=false",
        f"train.precision={precision}",
        f"train.batch_size={args.batch_size}",
        *MODES[mode],
    ]
    recipe, plugins = load_recipe(str(ROOT / "recipes" / f"{name}.toml"), overrides, ())
    counters.clear()
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(recipe, plugins, run_dir)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[args.warmup :])
    result = {
        "step_s": step,
        "samples_per_s": recipe.train.batch_size / step,
        "first_step_s": times[0],
        "graph_breaks": graph_breaks(),
    }
    if cuda:
        result["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry pass on the CPU (fp32)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("tiny_modes: no CUDA device; skipped (use --cpu for a dry pass)")
        return
    one_rank_group(cuda=not args.cpu)
    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    results: dict[str, dict[str, dict[str, float]]] = {}
    import tempfile

    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory() as scratch:
        for name in tqdm(args.recipes, desc="recipes"):
            for mode in args.modes:
                figures = measure(name, mode, args, f"{scratch}/{name}-{mode}")
                results.setdefault(name, {})[mode] = figures
                print(name, mode, json.dumps({k: round(v, 4) for k, v in figures.items()}), flush=True)
    figures = {"device": device, "torch": torch.__version__, "steps": args.steps, "results": results}
    print(f"wrote {record('tiny_modes_cpu' if args.cpu else 'tiny_modes', figures)}")


if __name__ == "__main__":
    main()
