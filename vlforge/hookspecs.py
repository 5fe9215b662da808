"""Every extension point of vlforge, one documented function each.

Two kinds of hooks:

* **Registration** (`vlforge_register_components`): called once when the plugin
  manager is built. A plugin adds named component factories to the registry.
  Components are then built once at setup and called as plain ``nn.Module``s
  inside the training step, so no hook dispatch happens in the hot path.

* **Loop events** (everything else): the engine fires them at step, eval and
  checkpoint boundaries only, never per layer or per micro-batch. Any object
  with ``@hookimpl`` methods can receive them: a plugin module, or a built
  component instance (the engine registers every built component that has
  hook implementations, e.g. a momentum teacher's EMA update).

All hooks are called with keyword arguments. Implementations may accept a
subset of the arguments (pluggy passes only the ones they name). Order is
pluggy's: last registered first, ``tryfirst``/``trylast`` to say otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from vlforge.engine import TrainState
    from vlforge.registry import Registry

PROJECT = "vlforge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration


@hookspec
def vlforge_register_components(registry: Registry) -> None:
    """Register this plugin's named components.

    Called once, when the plugin manager is built (and again for a plugin
    registered later, e.g. one named in a recipe's ``plugins`` list).

    ``registry`` offers ``registry.add(kind, name, config=Model, factory=fn)``
    where ``kind`` is one of ``vlforge.registry.KINDS`` (vision_encoder,
    text_encoder, adapter, fusion, objective, masking, teacher, dataset,
    evaluator, launcher, sink), ``config`` is a pydantic model validating the
    component's recipe table and ``factory(config, ctx)`` builds the component
    from the validated config and a ``vlforge.components.BuildContext``.
    A name already registered by another plugin is an error naming both.
    Returns nothing.
    """


# --------------------------------------------------------------------------- run lifecycle


@hookspec
def vlforge_run_start(state: TrainState) -> None:
    """The run is set up and about to take its first (or first resumed) step.

    Called on every rank after the model, optimizer, data and checkpoint (if
    resuming) are in place. ``state.step`` is 0 for a fresh run and the
    restored step for a resumed one. Returns nothing.
    """


@hookspec
def vlforge_run_end(state: TrainState, status: str) -> None:
    """The run has stopped.

    Called on every rank once the loop has exited, with ``status`` one of
    ``completed``, ``failed``, ``interrupted`` or ``preempted``. Called
    before the run's files are closed, so a plugin may still log. Returns
    nothing.
    """


# --------------------------------------------------------------------------- step events


@hookspec
def vlforge_step_start(state: TrainState) -> None:
    """An optimizer step is about to begin (before its first micro-batch).

    Use for schedules that change component settings per step (e.g. a mask
    ratio switch, a distillation weight warm-up); ``state.step`` is the index
    of the step about to run and ``state.samples_seen`` the samples before it.
    Returns nothing.
    """


@hookspec
def vlforge_after_forward(state: TrainState, losses: dict[str, Any]) -> None:
    """The last micro-batch of a step has run forward.

    ``losses`` maps each loss term name to its (detached) value, plus
    ``"loss"`` for the weighted total. Returns nothing.
    """


@hookspec
def vlforge_after_backward(state: TrainState) -> None:
    """Gradients of the whole step are accumulated, before clipping and the optimizer.

    The place to edit gradients (e.g. zero the gradient of embedding rows that
    must stay frozen). Called once per optimizer step, not per micro-batch.
    Returns nothing.
    """


@hookspec
def vlforge_after_optimizer_step(state: TrainState) -> None:
    """The optimizer has updated the weights and the scheduler has stepped.

    Called once per optimizer step (so under gradient accumulation once per
    window). Teachers update their EMA weights here; objectives clamp learnable
    temperatures. Returns nothing.
    """


# --------------------------------------------------------------------------- eval, checkpoints, logs


@hookspec
def vlforge_eval(state: TrainState, results: dict[str, dict[str, float]]) -> None:
    """Periodic evaluation has finished.

    ``results`` maps evaluator name to its metrics; a plugin may add entries
    (they are logged and indexed like the built-in ones). Called on every
    rank; the values are the same on all ranks. Returns nothing.
    """


@hookspec
def vlforge_save_checkpoint(state: TrainState, checkpoint: dict[str, Any]) -> None:
    """A checkpoint is being assembled (before it is written).

    ``checkpoint["plugins"]`` is a dict; a plugin stores its own state under
    a key of its own (module buffers such as queues already travel in the
    model's ``state_dict``). Called on rank 0; ``checkpoint`` becomes the
    checkpoint's ``train_state.pt`` (small, picklable state: docs/checkpoints.md).
    Returns nothing.
    """


@hookspec
def vlforge_load_checkpoint(state: TrainState, checkpoint: dict[str, Any]) -> None:
    """A checkpoint has been read and the model/optimizer state restored.

    A plugin reads back what it stored in ``checkpoint["plugins"]``.
    Returns nothing.
    """


@hookspec
def vlforge_log(state: TrainState, metrics: dict[str, float]) -> None:
    """Metrics for ``state.step`` are about to be written (rank 0 only).

    A plugin may add entries to ``metrics`` (e.g. a temperature, a queue
    fill level) or forward them elsewhere. Returns nothing.
    """
