"""Cost of watching a run: all three sinks + system metrics vs neither, on the quickstart recipe.

"watched": TensorBoard, W&B (offline) and MLflow (file store) sinks, the step timer, and the
live flush of the run writer (rows written at each log step at most once a second).
"bare": no sinks, a step timer that does nothing, the writer's default 30 s flushes.
Rounds alternate (bare, watched, bare, ...) in this one process so that machine noise hits
both alike; the median steps/s of each is reported (the sinks' thread runs in the same process
and competes for the same cores, as it would in a real run).

    python bench/watch_overhead.py [--steps 60] [--rounds 5]

On a shared machine round-to-round noise can exceed the 2 % looked for, so the watched rounds
also account for the watching directly, in the same run: the main thread's time in the step
timer's calls (per-call cost measured on the spot × calls made) and in the run writer's flushes
and hand-over to the sinks, plus all CPU time of the sinks' thread (as if it ran on the training
core). ``accounted_overhead`` is that time over the round's training time.

Prints a table and writes bench/results/watch_overhead.json. Goal: watched ≥ 0.98 × bare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from overhead import RECIPE, timed_overrides  # bench/ is on sys.path when run as a script
from record import record

from vlforge.engine import Trainer
from vlforge.launch.worker import LIVE_FLUSH_S
from vlforge.recipe import load_recipe
from vlforge.results.rundir import RunWriter
from vlforge.sinks.fanout import SinkSet, open_sinks
from vlforge.steptimer import StepTimer


class NoTimer:
    """The step timer's interface, doing nothing: the 'bare' loop."""

    def begin_step(self) -> None: ...
    def end_step(self) -> None: ...
    def count(self, batch: object) -> None: ...
    def read(self) -> dict[str, float]:
        return {}

    def phase(self, name: str):
        from contextlib import nullcontext

        return nullcontext()


class Accounts:
    """Seconds spent in the watching machinery during a watched round."""

    def __init__(self) -> None:
        self.main = 0.0  # flushes, sends, timer reads (wall time on the training thread)
        self.sink_thread_cpu = 0.0
        self.timer_calls = 0
        self.seconds = 0.0  # the round's training time

    def timed(self, func):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.main += time.perf_counter() - start

        return wrapper

    def counted(self, func):
        def wrapper(*args, **kwargs):
            self.timer_calls += 1
            return func(*args, **kwargs)

        return wrapper

    def install(self, run: RunWriter, trainer: Trainer) -> None:
        run.flush = self.timed(run.flush)  # chunk, status and trackers.json writes, the hand-over
        timer = trainer.timer
        timer.read = self.timed(timer.read)
        for name in ("begin_step", "end_step", "phase", "count"):
            setattr(timer, name, self.counted(getattr(timer, name)))


def timer_call_cost(calls: int = 20000) -> float:
    """Seconds per step-timer call on the CPU (a phase block counted as one call)."""
    timer = StepTimer(torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(calls // 4):
        timer.begin_step()
        with timer.phase("compute"):
            pass
        timer.count({"attention_mask": torch.ones(2, 2)})
        timer.end_step()
    return (time.perf_counter() - start) / calls


SERVE = SinkSet._serve


def sink_thread_cpu(accounts: Accounts, serve=SERVE):
    """SinkSet._serve, also recording the CPU time of the sinks' thread."""

    def wrapper(self, run):
        try:
            serve(self, run)
        finally:
            accounts.sink_thread_cpu += time.thread_time()

    return wrapper


def run_round(steps: int, root: str, watched: bool, accounts: Accounts | None = None) -> float:
    overrides = timed_overrides(steps)
    if watched:
        overrides += [
            'sinks.tb.type="tensorboard"',
            'sinks.wb.type="wandb"',
            'sinks.wb.mode="offline"',
            'sinks.ml.type="mlflow"',
            f'sinks.ml.tracking_uri="{Path(root, "mlruns").as_uri()}"',
        ]
    recipe, plugins = load_recipe(RECIPE, overrides)
    run = RunWriter.create(
        root,
        "bench",
        recipe_name=recipe.name,
        recipe_toml=recipe.to_toml(),
        config=recipe.resolved(),
        flush_seconds=LIVE_FLUSH_S if watched else 30.0,
    )
    run.sinks = open_sinks(recipe, plugins, run) if watched else None
    trainer = Trainer(recipe, plugins, run.run_dir, run)
    if not watched:
        trainer.timer = NoTimer()
    if accounts is not None:
        accounts.install(run, trainer)
    start = time.perf_counter()
    trainer.fit()  # logging, sinks' sends, the final checkpoint
    seconds = time.perf_counter() - start
    run.close("completed")  # the sinks finish here, outside the timing
    if accounts is not None:
        accounts.seconds = seconds
    return steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("WANDB_SILENT", "true")
    rates: dict[str, list[float]] = {"bare": [], "watched": []}
    accounted: list[float] = []
    per_call = timer_call_cost()
    with tempfile.TemporaryDirectory() as root:
        run_round(10, root, watched=True)  # warm-up: imports of the trackers, allocator, threads
        for round_ in range(args.rounds):
            for name in rates:
                accounts = Accounts() if name == "watched" else None
                SinkSet._serve = sink_thread_cpu(accounts) if accounts else SERVE
                rates[name].append(run_round(args.steps, root, name == "watched", accounts))
                print(f"round {round_ + 1}/{args.rounds} {name:8s} {rates[name][-1]:.3f} steps/s")
                if accounts:
                    spent = accounts.main + accounts.sink_thread_cpu + accounts.timer_calls * per_call
                    accounted.append(spent / accounts.seconds)
                    print(f"  watching accounted for {100 * accounted[-1]:.2f} % of the round")
    bare, watched = statistics.median(rates["bare"]), statistics.median(rates["watched"])
    result = {
        "benchmark": "watch_overhead",
        "recipe": RECIPE.name,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "log_every": 10,
        "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "threads": torch.get_num_threads(),
        "bare_steps_per_s": bare,
        "watched_steps_per_s": watched,
        "watched_over_bare": watched / bare,
        "accounted_overhead": statistics.median(accounted),
        "timer_call_s": per_call,
        "all_rounds": rates,
        "accounted_per_round": accounted,
    }
    print(f"\nbare     {bare:8.3f} steps/s (median of {args.rounds})")
    print(f"watched  {watched:8.3f} steps/s (tensorboard + wandb offline + mlflow + system metrics)")
    print(f"ratio    {watched / bare:8.3f}  (goal ≥ 0.98)")
    print(f"accounted overhead {100 * statistics.median(accounted):.2f} % of training time (goal ≤ 2 %)")
    record("watch_overhead", result)


if __name__ == "__main__":
    main()
