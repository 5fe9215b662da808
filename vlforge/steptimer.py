"""System metrics of the training loop: where step time goes, memory, throughput.

The engine marks a step's phases (``data``: waiting for and copying the next batch;
``compute``: forward and backward; ``optimizer``: clip, step, zero_grad) and reads the totals at
log steps only. On CUDA the compute and optimizer phases are timed with CUDA events, which the
host records without waiting; the one wait is at the log step, when the window's last event is
read. So timing adds no synchronisation to the step itself. Data wait is host time on every
device: it is the time the loop spends waiting for the loader.

Reported (rank 0's own figures, per GPU), as ordinary metrics at ``log_every``:
``sys/step_s``, ``sys/data_wait_s``, ``sys/fwd_bwd_s``, ``sys/optimizer_s`` (means per step in
the window), ``sys/samples_per_s_per_gpu``, ``sys/tokens_per_s_per_gpu`` (text tokens: the
batch's ``attention_mask`` sum, counted on the host before the copy), ``sys/host_rss_gb``, and on
CUDA ``sys/cuda_max_mem_gb`` (peak allocated in the window) and ``sys/gpu_util_pct`` (NVML, when
``nvidia-ml-py`` is installed).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

PHASES = ("data", "compute", "optimizer")
_NAMES = {"data": "sys/data_wait_s", "compute": "sys/fwd_bwd_s", "optimizer": "sys/optimizer_s"}
_GB = 1024**3


class StepTimer:
    """Accumulates phase times over a log window; :meth:`read` returns and resets them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.nvml = self.cuda  # until NVML turns out to be missing
        self._reset()

    def _reset(self) -> None:
        self.host = dict.fromkeys(PHASES, 0.0)
        self.events: dict[str, list[tuple[Any, Any]]] = {p: [] for p in PHASES}
        self.step_seconds = 0.0
        self.steps = 0
        self.samples = 0
        self.tokens: torch.Tensor | int = 0  # a host tensor sum: read (int) only at log steps
        self._step_start = 0.0

    def begin_step(self) -> None:
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        self.step_seconds += time.perf_counter() - self._step_start
        self.steps += 1

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name``; GPU work in it is timed by CUDA events (except data)."""
        if self.cuda and name != "data":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[name].append((start, end))
            return
        began = time.perf_counter()
        yield
        self.host[name] += time.perf_counter() - began

    def count(self, batch: Any) -> None:
        """Samples and text tokens of a (host) batch."""
        if not isinstance(batch, dict):
            return
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            self.samples += mask.shape[0]
            self.tokens = self.tokens + (mask.sum() if mask.device.type == "cpu" else mask.numel())
        else:
            first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
            self.samples += first.shape[0] if first is not None else 0

    def read(self) -> dict[str, float]:
        """The window's metrics (means per step); starts a new window."""
        if not self.steps:
            return {}
        seconds = dict(self.host)
        if self.cuda:
            last = [pairs[-1][1] for pairs in self.events.values() if pairs]
            if last:
                last[-1].synchronize()  # the one wait: all events of the window are then done
            for name, pairs in self.events.items():
                seconds[name] += sum(s.elapsed_time(e) for s, e in pairs) / 1000
        wall = max(self.step_seconds, 1e-9)
        metrics = {_NAMES[p]: seconds[p] / self.steps for p in PHASES}
        metrics |= {
            "sys/step_s": self.step_seconds / self.steps,
            "sys/samples_per_s_per_gpu": self.samples / wall,
            "sys/tokens_per_s_per_gpu": int(self.tokens) / wall,
            "sys/host_rss_gb": host_rss_bytes() / _GB,
        }
        if self.cuda:
            metrics["sys/cuda_max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / _GB
            torch.cuda.reset_peak_memory_stats(self.device)
            metrics |= self._gpu_utilisation()
        self._reset()
        return metrics

    def _gpu_utilisation(self) -> dict[str, float]:
        if not self.nvml:
            return {}
        try:
            return {"sys/gpu_util_pct": float(torch.cuda.utilization(self.device))}
        except Exception:  # no nvidia-ml-py, or NVML not usable here: skip it from now on
            self.nvml = False
            return {}


def host_rss_bytes() -> int:
    """Resident memory of this process now (Linux), else its peak (``getrusage``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux
