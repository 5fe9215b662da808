"""The built-in sinks: TensorBoard, Weights & Biases, MLflow. Each imports its tracker on start."""

from __future__ import annotations

import time
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlforge.recipe import flatten
from vlforge.sinks import MlflowConfig, SinkRun, TensorBoardConfig, WandbConfig

_MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED"}  # interrupted/preempted: KILLED
_MLFLOW_BATCH = 100  # params per log_batch call: MLflow's limit


def local_run_dir(run: SinkRun, what: str) -> str:
    """The run directory as a local path; trackers write local files only."""
    fs, path = fsspec.core.url_to_fs(run.run_dir)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"the run directory {run.run_dir} is not local: give this sink's {what}")
    return path


class TensorBoardSink:
    """One event file per attempt in ``log_dir``; TensorBoard reads them all as one run."""

    def __init__(self, config: TensorBoardConfig) -> None:
        self.config = config
        self.writer: Any = None

    def start(self, run: SinkRun) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.config.log_dir or f"{local_run_dir(run, 'log_dir')}/tensorboard"
        self.writer = SummaryWriter(log_dir)
        return {"log_dir": log_dir}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a call per log interval: TensorBoard shows it live

    def finish(self, status: str) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run with the vlforge run id as its id, so that a resumed run continues it."""

    def __init__(self, config: WandbConfig) -> None:
        self.config = config
        self.run: Any = None

    def start(self, run: SinkRun) -> dict[str, Any]:
        import wandb

        c = self.config
        self.run = wandb.init(
            project=c.project or run.experiment,
            entity=c.entity,
            id=run.saved.get("id", run.run_id),
            name=run.run_id,
            group=c.group,
            tags=c.tags or None,
            config=run.config,
            dir=c.dir or local_run_dir(run, "dir"),
            mode=c.mode,
            resume="allow",
            reinit="create_new",  # several runs in one process (tests, notebooks)
        )
        return {"id": self.run.id, "project": self.run.project}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class MlflowSink:
    """An MLflow run; its id is saved in the run directory, so that a resumed run continues it."""

    def __init__(self, config: MlflowConfig) -> None:
        self.config = config
        self.client: Any = None
        self.run_id = ""

    def start(self, run: SinkRun) -> dict[str, Any]:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.config.tracking_uri)
        if run.saved.get("run_id"):
            self.run_id = run.saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return run.saved
        name = self.config.experiment or run.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tags = {"vlforge.run_id": run.run_id, "vlforge.run_dir": run.run_dir, **self.config.tags}
        created = self.client.create_run(experiment_id, run_name=run.run_id, tags=tags)
        self.run_id = created.info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in flatten(run.config).items()]
        for first in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[first : first + _MLFLOW_BATCH])
        return {"run_id": self.run_id, "experiment_id": experiment_id}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(name, value, now, step) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=rows)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "KILLED"))
