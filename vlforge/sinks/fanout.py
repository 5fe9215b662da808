"""Hand the rows the run writer has written to every sink, on one background thread.

Why a thread: trackers talk to servers, and a slow or unreachable one must not stall training.
Why after the run writer: the run directory is the record; a sink only mirrors what is there.

Resuming: ``trackers.json`` in the run directory holds, per sink, what its ``start`` returned (the
tracker's run id) and the last step handed to it. It is rewritten *before* the rows go out, so
after a kill a resumed run skips the steps the tracker already has (none is sent twice; one that
was about to be sent may be missing) and continues the same tracker run.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import sys
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import fsspec

from vlforge.results.rundir import read_json, url_join, write_atomic
from vlforge.sinks import Sink, SinkRun

if TYPE_CHECKING:
    from vlforge.plugins import Plugins
    from vlforge.recipe import Recipe
    from vlforge.results.rundir import RunWriter

TRACKERS_FILE = "trackers.json"
CLOSE_TIMEOUT_S = 60.0  # at the end of a run, how long unsent rows may take to go out


def open_sinks(recipe: Recipe, plugins: Plugins, writer: RunWriter) -> SinkSet | None:
    """Build the recipe's ``[sinks.*]`` and start them (in the background); None if there are none."""
    if not recipe.sinks:
        return None
    from vlforge.components import BuildContext
    from vlforge.model import build_component

    ctx = BuildContext(recipe)
    sinks = {name: build_component(plugins, "sink", table, ctx) for name, table in recipe.sinks.items()}
    types = {name: table.type for name, table in recipe.sinks.items()}
    run = SinkRun("", writer.run_id, writer.run_dir, writer.experiment, recipe.name, recipe.resolved())
    return SinkSet(sinks, types, run)


class SinkSet:
    """Every sink of a run. ``send`` and ``close`` are called by the run writer (rank 0)."""

    def __init__(self, sinks: dict[str, Sink], types: dict[str, str], run: SinkRun) -> None:
        self.sinks = sinks
        self.types = types
        self.fs, self.path = fsspec.core.url_to_fs(url_join(run.run_dir, TRACKERS_FILE))
        saved = read_json(self.fs, self.path) if self.fs.exists(self.path) else {}
        self.state: dict[str, dict[str, Any]] = {
            name: saved.get(name, {"type": types[name], "last_step": -1, "run": {}}) for name in sinks
        }
        # Steps the previous attempts handed out already: skipped when this one logs them again.
        self.sent_before = {name: self.state[name]["last_step"] for name in sinks}
        self.failed: set[str] = set()  # sinks that raised once (reported) ...
        self.dead: set[str] = set()  # ... and those that could not even start (not called again)
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, args=(run,), name="vlforge-sinks", daemon=True)
        self.thread.start()

    # -- called by the run writer ------------------------------------------------------------

    def send(self, metric_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> None:
        """Queue freshly written rows; returns at once."""
        by_step: dict[int, dict[str, float]] = defaultdict(dict)
        for row in metric_rows:
            by_step[row["step"]][row["name"]] = row["value"]
        for row in eval_rows:
            parts = ("eval", row["evaluator"], row["dataset"], row["metric"])
            by_step[row["step"]]["/".join(p for p in parts if p)] = row["value"]
        if by_step:
            self.queue.put(("log", sorted(by_step.items())))

    def close(self, status: str) -> None:
        """Finish every sink; waits up to ``CLOSE_TIMEOUT_S`` for unsent rows."""
        self.queue.put(("finish", status))
        self.thread.join(CLOSE_TIMEOUT_S)
        if self.thread.is_alive():
            self._warn_all(f"rows not sent after {CLOSE_TIMEOUT_S:.0f} s at the end of the run; left behind")

    # -- the thread ---------------------------------------------------------------------------

    def _serve(self, run: SinkRun) -> None:
        for name, sink in self.sinks.items():
            self._call(name, self._start, name, sink, run)
        self._save()
        while True:
            kind, payload = self.queue.get()
            if kind == "finish":
                for name, sink in self.sinks.items():
                    if name not in self.dead:
                        self._call(name, sink.finish, payload)
                return
            self._log(payload)

    def _start(self, name: str, sink: Sink, run: SinkRun) -> None:
        self.dead.add(name)  # until start returns
        saved = self.state[name]["run"]
        self.state[name]["run"] = sink.start(dataclasses.replace(run, name=name, saved=saved))
        self.dead.discard(name)

    def _log(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        todo = {
            name: [(step, values) for step, values in steps if step > self.sent_before[name]]
            for name in self.sinks
            if name not in self.dead
        }
        for name, rows in todo.items():
            if rows:
                self.state[name]["last_step"] = max(self.state[name]["last_step"], rows[-1][0])
        self._save()  # before sending: a kill then loses a step at worst, never doubles one
        for name, rows in todo.items():
            for step, values in rows:
                if not self._call(name, self.sinks[name].log_metrics, step, values):
                    break  # the rest of this batch would most likely fail alike

    def _call(self, name: str, func: Any, *args: Any) -> bool:
        try:
            func(*args)
            return True
        except Exception as exc:  # a tracker's failure must never stop training
            if name not in self.failed:
                self.failed.add(name)
                self._warn(name, f"{type(exc).__name__}: {exc}")
            return False

    def _save(self) -> None:
        try:
            write_atomic(self.fs, self.path, json.dumps(self.state, indent=2).encode())
        except OSError as exc:
            self._warn_all(f"could not write {self.path} ({exc}); a resumed run may log steps twice")

    def _warn(self, name: str, problem: str) -> None:
        print(
            f"vlforge: warning: sink '{name}' ({self.types[name]}) failed: {problem}. Training goes on; "
            "the run directory keeps every metric, and this sink's later failures are not reported.",
            file=sys.stderr,
            flush=True,
        )

    def _warn_all(self, problem: str) -> None:
        print(f"vlforge: warning: sinks: {problem}", file=sys.stderr, flush=True)
