"""What `vlforge eval` evaluates: a checkpoint, its step, and where the results go (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalTarget:
    checkpoint: str  # checkpoint URL, or a run directory (its latest checkpoint)
    step: int  # the checkpoint's step: the evals rows' step
    into_run: bool  # True: add the evals to the run at RunJob.run_dir; False: a new eval-only run
    evaluators: tuple[str, ...] = ()  # the recipe's evaluators to run; () = all
