"""`vlforge eval` on every rank: load a checkpoint's weights, run the evaluators, log the results.

Each rank builds the run from the recipe (as training would), loads the
checkpoint's model weights (``vlforge.checkpoint.load_model_weights``) and
runs ``Trainer.evaluate`` at the checkpoint's step, so the numbers are those
the run's own evaluation would log. Rank 0 writes them as ``evals`` rows:
into the checkpoint's run (its status and recipe untouched), or into a new
eval-only run (``status completed``, config key ``eval_only.checkpoint``)
for a checkpoint from elsewhere; then it refreshes the index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlforge import distributed as dist

if TYPE_CHECKING:
    from vlforge.eval.target import EvalTarget
    from vlforge.launch.worker import RunJob
    from vlforge.plugins import Plugins
    from vlforge.recipe import Recipe


def run_evaluation(job: RunJob, target: EvalTarget, recipe: Recipe, plugins: Plugins) -> str:
    """Evaluate ``target`` on this rank; returns "completed" (an exception means it failed)."""
    from vlforge.checkpoint import load_model_weights
    from vlforge.engine import Trainer
    from vlforge.errors import UserError

    unknown = sorted(set(target.evaluators) - set(recipe.evaluators))
    if unknown:
        raise UserError(
            f"--evaluator {', '.join(unknown)}: not in the recipe (evaluators: "
            f"{', '.join(recipe.evaluators) or 'none'})"
        )
    writer = _writer(job, target, recipe) if dist.rank() == 0 else None
    status, reason = "failed", None
    try:
        trainer = Trainer(recipe, plugins, job.run_dir, writer)
        load_model_weights(trainer.model, target.checkpoint)
        trainer.progress.step = target.step
        trainer.evaluate(list(target.evaluators) or None)
        status = "completed"
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if writer is not None:
            if target.into_run:
                writer.flush()  # the run keeps its own status
            else:
                writer.close(status, reason)
            from vlforge.launch.worker import _refresh_index

            _refresh_index(job.root)
    return status


def _writer(job: RunJob, target: EvalTarget, recipe: Recipe) -> Any:
    import fsspec

    from vlforge.launch.worker import _open_writer
    from vlforge.results.rundir import RunWriter, read_json

    if target.into_run:
        fs, path = fsspec.core.url_to_fs(job.run_dir)
        return RunWriter(fs, path, read_json(fs, f"{path}/status.json"))
    return _open_writer(job, recipe, {"eval_only": {"checkpoint": target.checkpoint, "step": target.step}})
