"""Engine overhead: vlforge's training loop vs a plain hand-written PyTorch loop.

Same recipe-built model, same data, same optimizer and schedule; the only
difference is who runs the loop. Rounds alternate (plain, vlforge, plain, ...)
so that machine noise hits both alike; the median steps/s of each is reported.

    python bench/overhead.py [--steps 60] [--rounds 5]

Prints a table and writes bench/results/overhead.json. Goal: vlforge within 3%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from record import record  # bench/ is on sys.path when run as a script

from vlforge.engine import Trainer, lr_factor, parameter_groups, to_device
from vlforge.model import Progress
from vlforge.recipe import load_recipe
from vlforge.results.rundir import RunWriter

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"


def timed_overrides(steps: int) -> list[str]:
    """The quickstart as both overhead benchmarks time it: ``steps`` steps, logs every 10, no
    evaluation, no periodic checkpoint, no progress bar."""
    return [
        f"train.steps={steps}",
        "train.progress=false",
        "train.log_every=10",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "evaluators={}",
    ]


def make_trainer(steps: int, root: str) -> Trainer:
    recipe, plugins = load_recipe(RECIPE, timed_overrides(steps))
    run = RunWriter.create(
        root, "bench", recipe_name=recipe.name, recipe_toml=recipe.to_toml(), config=recipe.resolved()
    )
    return Trainer(recipe, plugins, run.run_dir, run)


def time_vlforge(steps: int, root: str) -> float:
    trainer = make_trainer(steps, root)
    start = time.perf_counter()
    trainer.fit()  # includes logging, events, the progress bookkeeping and the final checkpoint
    return steps / (time.perf_counter() - start)


def time_plain(steps: int, root: str) -> float:
    """The loop a researcher would write by hand around the same parts."""
    trainer = make_trainer(steps, root)  # only to build identical parts; its loop is not used
    recipe, model, stream = trainer.recipe, trainer.model, trainer.stream
    optimizer = torch.optim.AdamW(
        parameter_groups(model, recipe.optim),
        lr=recipe.optim.lr,
        betas=recipe.optim.betas,
        eps=recipe.optim.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, recipe.schedule))
    progress = Progress(total_steps=steps)
    start = time.perf_counter()
    for step in range(steps):
        batch = to_device(stream.next(), trainer.device)
        loss, _ = model(batch, progress)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        if step % 10 == 0:
            print(f"\r  plain step {step} loss {loss.item():.4f}", end="")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f"{root}/plain.pt")
    print("\r", end="")
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rates: dict[str, list[float]] = {"plain": [], "vlforge": []}
    with tempfile.TemporaryDirectory() as root:
        time_plain(10, root)  # warm-up: allocator, thread pools, lazy imports
        for round_ in range(args.rounds):
            for name, fn in (("plain", time_plain), ("vlforge", time_vlforge)):
                rates[name].append(fn(args.steps, root))
                print(f"round {round_ + 1}/{args.rounds} {name:8s} {rates[name][-1]:.2f} steps/s")
    plain, engine = statistics.median(rates["plain"]), statistics.median(rates["vlforge"])
    result = {
        "benchmark": "overhead",
        "recipe": str(RECIPE.name),
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "threads": torch.get_num_threads(),
        "plain_steps_per_s": plain,
        "vlforge_steps_per_s": engine,
        "vlforge_over_plain": engine / plain,
        "all_rounds": rates,
    }
    print(f"\nplain loop   {plain:8.2f} steps/s (median of {args.rounds})")
    print(f"vlforge      {engine:8.2f} steps/s")
    print(f"ratio        {engine / plain:8.3f}  (goal ≥ 0.97)")
    record("overhead", result)


if __name__ == "__main__":
    main()
