"""The training loop: build once, then step plain modules; events only at boundaries.

One optimizer step = ``accum_steps`` micro-batches (DDP gradient sync only on
the last), then one clip, one optimizer and one scheduler step. Loop events
(``vlforge.hookspecs``) fire once per optimizer step, eval and checkpoint.

Stopping: SIGINT/SIGTERM/SIGUSR2 only set a flag; the loop sees it at the next
step boundary, writes a checkpoint and stops (``interrupted`` for SIGINT,
``preempted`` otherwise, so a launcher can requeue). A non-finite loss stops
the run as ``failed`` without writing a checkpoint, so the last good one stays
the latest.

No host-device sync in a step that does not log: the non-finite check is a flag
on the device (the first bad step), read when the step logs and before every
checkpoint; stop requests are agreed over the CPU (gloo) backend every step.
"""

from __future__ import annotations

import functools
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import nn

from vlforge import checkpoint as ckpt
from vlforge import distributed as dist
from vlforge import parallel
from vlforge.components import BuildContext
from vlforge.data.stream import make_stream
from vlforge.errors import RunFailed
from vlforge.model import Progress, VLModel, build_component, build_model
from vlforge.optim import parameter_groups
from vlforge.plugins import Plugins
from vlforge.recipe import Recipe, ScheduleSection
from vlforge.runlog import progress_line
from vlforge.steptimer import StepTimer
from vlforge.weights.importing import load_init_weights

STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "preempted", signal.SIGUSR2: "preempted"}


NO_STEP = 2**62  # ``first_nonfinite`` while every loss was finite


class NonFiniteLossError(RunFailed):
    """The loss became NaN or infinite; the run stopped without checkpointing it."""


@dataclass
class TrainState:
    """What loop events receive. Read freely; change only what your plugin owns."""

    recipe: Recipe
    model: VLModel  # not the DDP wrapper (under FSDP: sharded in place)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress
    run_dir: str
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def samples_seen(self) -> int:
        return self.progress.samples_seen


# --------------------------------------------------------------------------- setup helpers


def select_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on CUDA (``auto`` or ``bf16``), bf16 on CPU only if asked."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str):
    """The autocast context factory of ``uses_bf16``; else nothing."""
    if not uses_bf16(device, precision):
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_factor(step: int, total: int, schedule: ScheduleSection) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine/linear/constant."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return 1.0
    span = max(1, total - schedule.warmup_steps)
    done = min(1.0, (step - schedule.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * done)) if schedule.decay == "cosine" else 1 - done
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * shape


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds a run from a validated recipe and trains it on this process's rank."""

    def __init__(self, recipe: Recipe, plugins: Plugins, run_dir: str, run: Any = None) -> None:
        self.recipe = recipe
        self.plugins = plugins
        self.run = run  # RunWriter on rank 0, None elsewhere
        self.device = select_device()
        self.autocast = autocast_for(self.device, recipe.train.precision)
        self.stop_status: str | None = None
        self.timer = StepTimer(self.device)  # system metrics, read at log steps
        train = recipe.train
        world = dist.world_size()
        self.micro_batch = train.batch_size // (world * train.accum_steps)

        seed_everything(recipe.seed)  # same initial weights on every rank
        self.ctx = BuildContext(recipe, rank=dist.rank(), world_size=world, device=str(self.device))
        model = build_model(recipe, plugins, self.ctx).to(self.device)
        self.data = build_component(plugins, "dataset", recipe.data, self.ctx)
        self.ctx.parts["data"] = self.data
        # Each evaluator evaluates in its own context: the run's, with its own data table's source.
        self.eval_contexts = {name: self._eval_context(table) for name, table in recipe.evaluators.items()}
        self.evaluators = {
            name: build_component(plugins, "evaluator", table, self.eval_contexts[name])
            for name, table in recipe.evaluators.items()
        }
        seed_everything(recipe.seed + 1000 * dist.rank())  # per-rank randomness from here on
        self.stream = make_stream(self.data, self.micro_batch, recipe.seed, train.num_workers)
        self.wrapped: nn.Module = parallel.apply(model, recipe, self.device, world)  # what the step calls
        # What gradient clipping reads each step, listed once (after FSDP made its parameters DTensors).
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        lr = recipe.optim.lr * (train.batch_size / 256 if recipe.optim.lr_scaling == "per256" else 1)
        groups = [group | {"lr": lr * group["lr_scale"]} for group in parameter_groups(model, recipe.optim)]
        optimizer = torch.optim.AdamW(
            parallel.split_sharded(groups),
            lr=lr,
            betas=recipe.optim.betas,
            eps=recipe.optim.eps,
            **parallel.optimizer_options(self.device),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, train.steps, recipe.schedule)
        )
        progress = Progress(
            steps_per_epoch=max(1, self.stream.batches_per_epoch() // train.accum_steps),
            total_steps=train.steps,
        )
        self.state = TrainState(
            recipe, model, optimizer, scheduler, progress, run_dir, dist.rank(), world, self.device
        )
        # Any module with @hookimpl methods receives loop events, however deeply it is nested
        # (an objective wrapping another keeps the inner one's temperature clamp, say).
        for name, module in model.named_modules():
            plugins.register_component(module, f"component:{name or 'model'}")
        plugins.register_component(self.data, "component:data")  # e.g. logs data/skipped_* counters
        # The first step whose loss was not finite, on the device (NO_STEP: none yet).
        self.first_nonfinite = torch.full((), NO_STEP, dtype=torch.long, device=self.device)

    def _eval_context(self, table: Any) -> BuildContext:
        """The run's context, with ``parts["data"]`` built from the evaluator's own data table if any."""
        if table.data is None:
            return self.ctx
        ctx = replace(self.ctx, parts=dict(self.ctx.parts))
        ctx.parts["data"] = build_component(self.plugins, "dataset", table.data, ctx)
        return ctx

    @property
    def model(self) -> VLModel:
        return self.state.model

    @property
    def progress(self) -> Progress:
        return self.state.progress

    # ------------------------------------------------------------------ checkpoints

    @functools.cached_property
    def checkpointer(self) -> ckpt.Checkpointer:
        return ckpt.Checkpointer(self.state.run_dir, self.recipe.train.keep_checkpoints)

    def save(self) -> str | None:
        """Checkpoint this step on every rank; its URL on rank 0 once committed (None if async).

        Periodic saves are asynchronous with ``train.async_checkpoint``; the last save of a run
        (final step or a stop) always waits for its commit.
        """
        if self.run is not None:
            self.run.flush()  # metrics up to this step are on disk before its checkpoint commits
        rng = dist.all_gather_object(rng_state())  # every rank's RNG, restored per rank
        data = dist.all_gather_object(self.stream.state_dict())  # sharded streams differ per rank
        train_state = None
        if self.state.rank == 0:
            train_state = {
                "run_id": getattr(self.run, "run_id", None),
                "progress": vars(self.progress).copy(),
                "data": data,
                "scheduler": self.state.scheduler.state_dict(),
                "rng": rng,
                "world_size": self.state.world_size,
                "plugins": {},
            }
            self.plugins.call("vlforge_save_checkpoint", state=self.state, checkpoint=train_state)
        train = self.recipe.train
        # Frozen pretrained weights are rebuilt from the recipe on resume, unless they came from
        # model.init_from (which a resume does not read again).
        rebuilt = not train.checkpoint_frozen and not self.recipe.model.init_from
        last = self.progress.step >= train.steps or self.stop_status is not None
        return self.checkpointer.save(
            self.progress.step,
            self.model,
            self.state.optimizer,
            train_state,
            exclude=ckpt.frozen_pretrained_keys(self.model) if rebuilt else (),
            blocking=last or not train.async_checkpoint,
        )

    def restore(self, url: str) -> None:
        """Resume from ``url`` (any world size for model and optimizer; see docs/checkpoints.md)."""
        checkpoint = self.checkpointer.load(url, self.model, self.state.optimizer)
        self.state.scheduler.load_state_dict(checkpoint["scheduler"])
        for key, value in checkpoint["progress"].items():
            setattr(self.progress, key, value)
        same_world = checkpoint["world_size"] == self.state.world_size
        # Another world size: rank 0's position with every rank's; the stream continues its epoch
        # in the same global order (docs/data.md).
        data = checkpoint["data"]
        self.stream.load_state_dict(data[self.state.rank] if same_world else {**data[0], "every_rank": data})
        if same_world:
            set_rng_state(checkpoint["rng"][self.state.rank])
        self.plugins.call("vlforge_load_checkpoint", state=self.state, checkpoint=checkpoint)

    # ------------------------------------------------------------------ steps

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over ``accum_steps`` micro-batches; returns detached mean losses."""
        state, accum = self.state, self.recipe.train.accum_steps
        self.timer.begin_step()
        self.plugins.call("vlforge_step_start", state=state)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            with self.timer.phase("data"):
                host_batch = self.stream.next()
                self.timer.count(host_batch)
                batch = to_device(host_batch, self.device)
            sync = parallel.gradient_sync(self.wrapped, enabled=micro == accum - 1)
            with sync, self.timer.phase("compute"):
                with self.autocast():
                    loss, terms = self.wrapped(batch, self.progress)
                (loss / accum).backward()
            for name, value in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0) + value.detach().float() / accum
        self.plugins.call("vlforge_after_forward", state=state, losses=sums)
        self.plugins.call("vlforge_after_backward", state=state)
        with self.timer.phase("optimizer"):
            if self.recipe.train.grad_clip:
                sums["grad_norm"] = parallel.clip_grad_norm(self.trainable, self.recipe.train.grad_clip)
            state.optimizer.step()
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.samples_seen += self.recipe.train.batch_size
        self.progress.epoch = self.stream.epoch
        self.plugins.call("vlforge_after_optimizer_step", state=state)
        bad = ~torch.isfinite(sums["loss"])  # on the device: no sync
        self.first_nonfinite = torch.where(
            bad & (self.first_nonfinite == NO_STEP), self.progress.step, self.first_nonfinite
        )
        self.timer.end_step()
        return sums

    def stop_requested(self) -> bool:
        """A stop signal arrived on any rank; agreed on the host (the group's CPU backend), no device sync."""
        if self.state.world_size == 1:
            return self.stop_status is not None
        flag = torch.tensor([self.stop_status is not None], dtype=torch.uint8)
        return bool(dist.all_reduce(flag, op="max", on_host=True))

    def check_finite(self, sums: dict[str, torch.Tensor]) -> None:
        """Raise ``NonFiniteLossError`` if any rank saw a non-finite loss (one host sync)."""
        first = int(dist.all_reduce(self.first_nonfinite, op="min"))
        if first != NO_STEP:
            raise NonFiniteLossError(self._nonfinite_message(first, sums))

    def evaluate(self, names: list[str] | None = None) -> dict[str, dict[str, float]]:
        """Run the evaluators (``names``, default all) on every rank; each rank embeds its share.

        Evaluators gather their shares themselves (``vlforge.eval.shards``), so every rank
        returns the one-process metrics; rank 0's are logged.
        """
        results: dict[str, dict[str, float]] = {}
        # Evaluators may draw random numbers (a DataLoader's seed, say); put the RNG back so
        # that how often a run evaluates never changes how it trains.
        saved = rng_state()
        for name in names or list(self.evaluators):
            results[name] = self.evaluators[name].evaluate(self.model, self.eval_contexts[name])
        set_rng_state(saved)
        self.plugins.call("vlforge_eval", state=self.state, results=results)
        if self.run is not None:
            for name, metrics in results.items():
                self.run.log_eval(self.progress.step, name, metrics)
        return results

    def log(self, sums: dict[str, torch.Tensor], window: tuple[float, int]) -> dict[str, float]:
        names = sorted(sums)
        values = dist.all_reduce_mean(torch.stack([sums[n].float().reshape(()) for n in names]))
        metrics = {f"train/{n}": float(v) for n, v in zip(names, values.tolist())}
        seconds, samples = time.perf_counter() - window[0], self.progress.samples_seen - window[1]
        metrics["train/lr"] = self.state.optimizer.param_groups[0]["lr"]
        metrics["train/samples_per_s"] = samples / max(seconds, 1e-9)
        metrics["train/epoch"] = float(self.progress.epoch)
        metrics |= self.timer.read()
        if self.run is not None:
            self.plugins.call("vlforge_log", state=self.state, metrics=metrics)
            self.run.log_metrics(self.progress.step, metrics)  # its periodic flush is the heartbeat
        return metrics

    # ------------------------------------------------------------------ the loop

    def fit(self) -> str:
        """Train to ``train.steps`` (or until stopped); returns the final run status."""
        train = self.recipe.train
        if self.progress.step == 0 and self.recipe.model.init_from:
            load_init_weights(self.model, self.recipe.model.init_from)
        self.plugins.call("vlforge_run_start", state=self.state)
        status = "completed"
        bar = self._progress_bar()
        previous = self._install_signal_handlers()
        try:
            window = (time.perf_counter(), self.progress.samples_seen)
            started = (window[0], self.progress.step)
            while self.progress.step < train.steps:
                sums = self.train_step()
                stop = self.stop_requested()
                step = self.progress.step
                logs = step % train.log_every == 0 or step == train.steps
                saves = train.checkpoint_every and step % train.checkpoint_every == 0
                if logs or saves or stop:  # nothing non-finite is logged or checkpointed
                    self.check_finite(sums)
                if logs:
                    metrics = self.log(sums, window)
                    window = (time.perf_counter(), self.progress.samples_seen)
                    self._progress_line(metrics, started, bar)
                    bar.set_postfix(
                        loss=f"{metrics['train/loss']:.4f}",
                        lr=f"{metrics['train/lr']:.2e}",
                        sps=f"{metrics['train/samples_per_s']:.0f}",
                        refresh=False,
                    )
                bar.update(1)
                if stop:
                    status = self.stop_status or "preempted"
                    break
                if train.eval_every and step % train.eval_every == 0 and step < train.steps:
                    self.evaluate()
                if saves and step < train.steps:
                    self.save()
            self.save()  # before the final evaluation: a failing evaluator never loses the training
            if status == "completed" and self.evaluators:
                self.evaluate()
        except BaseException:
            status = "failed"
            raise
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
            self.plugins.call("vlforge_run_end", state=self.state, status=status)
        return status

    def _progress_line(self, metrics: dict[str, float], started: tuple[float, int], bar: Any) -> None:
        """``step 10/100 loss=… lr=… samples/s=… eta=…``: into log.txt, and printed without a bar."""
        if self.state.rank != 0:
            return
        done, total = self.progress.step, self.recipe.train.steps
        per_step = (time.perf_counter() - started[0]) / max(done - started[1], 1)
        eta = timedelta(seconds=round(per_step * (total - done)))
        text = (
            f"step {done}/{total} loss={metrics['train/loss']:.4f} lr={metrics['train/lr']:.3e} "
            f"samples/s={metrics['train/samples_per_s']:.1f} eta={eta}"
        )
        progress_line(text, to_terminal=bar.disable or not sys.stderr.isatty())

    def _nonfinite_message(self, first: int, sums: dict[str, torch.Tensor]) -> str:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(sums.items()))
        last = ckpt.latest_checkpoint(self.state.run_dir)
        kept = f"last good checkpoint: {last}" if last else "no checkpoint was written before it"
        return (
            f"non-finite loss at step {first} (at step {self.progress.step}: {terms}); "
            f"training stopped, {kept}"
        )

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.recipe.train.steps,
            initial=self.progress.step,
            disable=self.state.rank != 0 or not self.recipe.train.progress,
            desc=self.recipe.name,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def _install_signal_handlers(self) -> dict[int, Any]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum: int, _frame: Any) -> None:
            self.stop_status = STOP_SIGNALS[signal.Signals(signum)]

        return {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
