"""Several datasets behind one ``[data]`` table, mixed by micro-batch.

Every micro-batch comes whole from one source (sources may format batches
differently: pairs and interleaved documents) and says which in
``batch["dataset"]``. The choice is the same on every rank, so all ranks run
the same objectives on the same kind of batch:

* ``mode = "sample"``: micro-batch ``b``'s source is drawn with probability
  proportional to its ``weight``, from a generator seeded by (seed, b).
* ``mode = "cycle"``: sources in turn, in the order the recipe lists them.
  With ``train.accum_steps`` equal to the number of sources, every optimizer
  step sums the gradients of one micro-batch per dataset: Flamingo's
  "accumulation over datasets" (the loss weights are the plugin's).

Each source keeps its own resumable stream (and workers); the mix's position
is the number of micro-batches taken plus every source's own position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlforge.data.stream import TrainStream, make_stream
from vlforge.errors import UserError
from vlforge.hookspecs import hookimpl

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.data import MixConfig


class MixStream:
    """Micro-batches from ``streams`` chosen per ``mode``; a ``TrainStream``."""

    def __init__(
        self, names: list[str], streams: list[TrainStream], weights: list[float], mode: str, seed: int
    ):
        self.names, self.streams, self.mode, self.seed = names, streams, mode, seed
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.taken = 0  # micro-batches taken so far (all sources)

    def source_of(self, index: int) -> int:
        """Which source gives micro-batch ``index``."""
        if self.mode == "cycle":
            return index % len(self.streams)
        return int(np.random.default_rng([self.seed, index]).choice(len(self.streams), p=self.probabilities))

    def next(self) -> dict[str, Any]:
        chosen = self.source_of(self.taken)
        batch = self.streams[chosen].next()
        self.taken += 1
        batch["dataset"] = self.names[chosen]
        return batch

    @property
    def epoch(self) -> int:
        """The epoch of the source that is slowest through its data."""
        return min(stream.epoch for stream in self.streams)

    def batches_per_epoch(self) -> int:
        """Mix micro-batches until the slowest source finishes an epoch."""
        shares = (
            self.probabilities if self.mode == "sample" else np.full(len(self.streams), 1 / len(self.streams))
        )
        return max(1, int(max(s.batches_per_epoch() / p for s, p in zip(self.streams, shares))))

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self.taken, "sources": {n: s.state_dict() for n, s in zip(self.names, self.streams)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.taken = state["taken"]
        every_rank = state.get("every_rank")  # another world size: each source gets every rank's too
        for name, stream in zip(self.names, self.streams):
            source_state = state["sources"][name]
            if every_rank:
                of_every_rank = [saved["sources"][name] for saved in every_rank]
                source_state = {**source_state, "every_rank": of_every_rank}
            stream.load_state_dict(source_state)

    def metrics(self) -> dict[str, float]:
        """Each source's ``data/*`` counters as ``data/<source>/*``."""
        metrics = {}
        for name, stream in zip(self.names, self.streams):
            for key, value in getattr(stream, "metrics", dict)().items():
                metrics[f"data/{name}/{key.removeprefix('data/')}"] = value
        return metrics


class MixData:
    """The ``mix`` data source: builds each named dataset; evaluators use ``eval_source``'s splits."""

    def __init__(self, config: MixConfig, sources: dict[str, Any]) -> None:
        self.config = config
        self.sources = sources
        self.eval_name = config.eval_source or next(iter(sources))
        self.stream: MixStream | None = None

    @classmethod
    def from_context(cls, config: MixConfig, ctx: BuildContext) -> MixData:
        return cls(config, {name: _build_source(name, table, ctx) for name, table in config.sources.items()})

    def train_stream(
        self, micro_batch: int, seed: int, num_workers: int, rank: int, world_size: int
    ) -> MixStream:
        streams = [
            make_stream(
                source,
                self.config.sources[name].micro_batch or micro_batch,
                seed + index,  # independent shuffles per source
                num_workers,
            )
            for index, (name, source) in enumerate(self.sources.items())
        ]
        weights = [table.weight for table in self.config.sources.values()]
        self.stream = MixStream(list(self.sources), streams, weights, self.config.mode, seed)
        return self.stream

    def dataset(self, split: str) -> Any:
        return self.sources[self.eval_name].dataset(split)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return self.sources[self.eval_name].collate(items)

    def __getattr__(self, name: str) -> Any:
        # Evaluator helpers of the eval source (e.g. class_names, prompt_templates of synthetic.shapes).
        if name.startswith("_") or name in ("sources", "eval_name"):
            raise AttributeError(name)
        return getattr(self.sources[self.eval_name], name)

    @hookimpl
    def vlforge_log(self, metrics: dict[str, float]) -> None:
        """Adds every source's ``data/*`` counters as ``data/<source>/*``."""
        if self.stream is not None:
            metrics.update(self.stream.metrics())


def _build_source(name: str, table: Any, ctx: BuildContext) -> Any:
    """Validate ``[data.sources.<name>]`` against its registered config and build it."""
    from pydantic import ValidationError

    from vlforge.plugins import load_plugins

    # The recipe validated only the mix's own keys: each source's table is checked here, at build.
    registry = load_plugins(list(getattr(ctx.recipe, "plugins", None) or [])).registry
    component = registry.get("dataset", table.type)
    try:
        config = component.config.model_validate(table.model_extra or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"data.sources.{name}.{'.'.join(map(str, error['loc']))}: {error['msg']}"
            for error in exc.errors()
        )
        raise UserError(f"dataset '{table.type}' of mix source '{name}': {problems}") from exc
    return component.factory(config, ctx)
