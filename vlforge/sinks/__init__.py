"""Sinks: trackers a run reports to besides its run directory (``[sinks.<name>]`` tables).

This module stays light (no tracker import): it holds the config models, the :class:`Sink`
protocol and registers factories; each tracker's package is imported when its sink starts, and
each is an optional extra (``pip install 'vlforge[wandb]'``). Validation names the extra to
install when the package is missing.

The run directory and the DuckDB index stay the record: a sink gets the rows the run writer has
just written (:class:`vlforge.sinks.fanout.SinkSet`), on a thread of its own, so a slow or failing
tracker never stalls or stops training.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import Field, model_validator

from vlforge.registry import ComponentConfig, Registry

if TYPE_CHECKING:
    from vlforge.components import BuildContext


@dataclass(frozen=True)
class SinkRun:
    """What a sink learns about the run when it starts."""

    name: str  # the table's name under [sinks]
    run_id: str
    run_dir: str  # URL of the run directory
    experiment: str
    recipe_name: str
    config: dict[str, Any]  # the resolved recipe
    # What ``start`` returned on an earlier attempt of this run (a resume or requeue), else {}:
    # the tracker's own run id, so that the tracker run continues.
    saved: dict[str, Any] = field(default_factory=dict)


class Sink(Protocol):
    """A tracker. Calls come from one thread, in order; any of them may raise (it is reported once)."""

    def start(self, run: SinkRun) -> dict[str, Any]:
        """Open (or, from ``run.saved``, reopen) the tracker run; return what resuming it needs."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Values at ``step``; steps only grow (evals come as ``eval/<evaluator>/<metric>``)."""

    def finish(self, status: str) -> None:
        """The run ended with ``status`` (completed, failed, interrupted, preempted)."""


class _TrackerConfig(ComponentConfig):
    """A tracker's config: validating it checks that the tracker's package is installed."""

    _package: ClassVar[str]  # the module to import; the vlforge extra of the same name installs it

    @model_validator(mode="after")
    def _installed(self) -> _TrackerConfig:
        if importlib.util.find_spec(self._package) is None:
            raise ValueError(
                f"this sink needs the '{self._package}' package, which is not installed: "
                f"pip install 'vlforge[{self._package}]'"
            )
        return self


class TensorBoardConfig(_TrackerConfig):
    """``[sinks.<name>] type = "tensorboard"``: event files, by default in <run dir>/tensorboard."""

    _package = "tensorboard"

    log_dir: str | None = Field(None, description="where event files go; default <run dir>/tensorboard")


class WandbConfig(_TrackerConfig):
    """``[sinks.<name>] type = "wandb"``: a Weights & Biases run whose id is the vlforge run id."""

    _package = "wandb"

    project: str | None = Field(None, description="W&B project; default the recipe's experiment")
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"  # offline: files under dir, `wandb sync` later
    dir: str | None = Field(None, description="W&B's local files; default the run directory")
    group: str | None = None
    tags: list[str] = Field(default_factory=list)


class MlflowConfig(_TrackerConfig):
    """``[sinks.<name>] type = "mlflow"``: an MLflow run on any tracking server or store."""

    _package = "mlflow"

    tracking_uri: str | None = Field(None, description="default: MLflow's own (MLFLOW_TRACKING_URI)")
    experiment: str | None = Field(None, description="MLflow experiment; default the recipe's experiment")
    tags: dict[str, str] = Field(default_factory=dict)


def _tensorboard(config: TensorBoardConfig, ctx: BuildContext) -> Sink:
    """TensorBoard event files (torch.utils.tensorboard)."""
    from vlforge.sinks.trackers import TensorBoardSink

    return TensorBoardSink(config)


def _wandb(config: WandbConfig, ctx: BuildContext) -> Sink:
    """Weights & Biases, online or offline."""
    from vlforge.sinks.trackers import WandbSink

    return WandbSink(config)


def _mlflow(config: MlflowConfig, ctx: BuildContext) -> Sink:
    """MLflow, any tracking URI."""
    from vlforge.sinks.trackers import MlflowSink

    return MlflowSink(config)


def register(registry: Registry) -> None:
    registry.add("sink", "tensorboard", config=TensorBoardConfig, factory=_tensorboard)
    registry.add("sink", "wandb", config=WandbConfig, factory=_wandb)
    registry.add("sink", "mlflow", config=MlflowConfig, factory=_mlflow)
