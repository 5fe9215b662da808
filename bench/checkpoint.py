"""Checkpoint cost: today's single file (torch.save on rank 0) vs DCP, on 2 CPU ranks (gloo).

A 201M-parameter model (12 x Linear(4096, 4096)) with AdamW state (3 x 805 MB in all), held
replicated (DDP, what runs today) or sharded (FSDP2 ``fully_shard``). For each: save time
(sync; async: the time training is blocked, and until commit), load time, bytes written per
rank, and rank 0's peak RSS during each, next to the rank's own share of the state.

    python bench/checkpoint.py [--layers 12] [--width 4096]

Prints a table and writes bench/results/checkpoint.json. Goal: DCP peak RSS < 1.2 x share.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from record import record  # bench/ is on sys.path when run as a script
from torch import nn

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The highest RSS of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._running = rss(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's own tensors: parameters and optimizer state (local shards under FSDP)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = sum(local(p).numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(local(v).numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def build(layers: int, width: int, layout: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    if layout == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step: AdamW's state exists, as in a checkpoint mid-run
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def timed(fn) -> tuple[float, int, object]:
    dist.barrier()
    with PeakRSS() as peak:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    dist.barrier()
    return seconds, peak.peak, out


def legacy_save(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> int:
    """What Trainer.save did before DCP: rank 0 stages the whole state in memory, then writes it."""
    if dist.get_rank() != 0:
        return 0
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
    return buffer.getbuffer().nbytes


def legacy_load(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Every rank reads the whole file (ranks take turns here, so the machine's memory holds)."""
    for turn in range(dist.get_world_size()):
        if turn == dist.get_rank():
            with open(path, "rb") as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            del state
        dist.barrier()


def rank_bytes(url: str, rank: int) -> int:
    from vlforge.checkpoint import read_manifest

    parts = read_manifest(url)["parts"]
    mine = [p for name, p in parts.items() if name.startswith(f"__{rank}_")]
    return sum(p["size"] for p in mine)


def measure(layout: str, layers: int, width: int, folder: str) -> dict:
    """Rank 0's figures; RSS peaks count from ``rss_empty`` (the process before the model existed)."""
    from vlforge.checkpoint import Checkpointer

    empty = rss()
    model, optimizer = build(layers, width, layout)
    rank = dist.get_rank()
    row: dict = {"layout": layout, "share_bytes": state_bytes(model, optimizer), "rss_empty": empty}
    row["rss_with_state"] = rss()
    if layout == "ddp":
        path = f"{folder}/step_00000001.pt"
        seconds, peak, written = timed(lambda: legacy_save(model, optimizer, path))
        row["legacy"] = {"save_s": seconds, "save_peak_rss": peak, "bytes_rank0": written}
        seconds, peak, _ = timed(lambda: legacy_load(model, optimizer, path))
        row["legacy"] |= {"load_s": seconds, "load_peak_rss": peak}
        if rank == 0:
            os.remove(path)
    saver = Checkpointer(f"{folder}/{layout}", keep=1)
    seconds, peak, url = timed(lambda: saver.save(1, model, optimizer, {} if rank == 0 else None))
    url = [url]
    dist.broadcast_object_list(url)
    row["dcp"] = {"save_s": seconds, "save_peak_rss": peak, "bytes_rank0": rank_bytes(url[0], 0)}
    row["dcp"]["bytes_rank1"] = rank_bytes(url[0], 1)

    def async_save() -> float:
        start = time.perf_counter()
        saver.save(2, model, optimizer, {} if rank == 0 else None, blocking=False)
        blocked = time.perf_counter() - start
        saver.wait()
        return blocked

    seconds, peak, blocked = timed(async_save)
    row["dcp_async"] = {"blocked_s": blocked, "until_commit_s": seconds, "save_peak_rss": peak}
    seconds, peak, _ = timed(lambda: saver.load(saver_url(folder, layout), model, optimizer))
    row["dcp"] |= {"load_s": seconds, "load_peak_rss": peak}
    return row


def saver_url(folder: str, layout: str) -> str:
    from vlforge.checkpoint import latest_checkpoint

    return latest_checkpoint(f"{folder}/{layout}")


def worker(rank: int, port: int, layout: str, layers: int, width: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    row = measure(layout, layers, width, folder)
    if rank == 0:
        Path(folder, f"{layout}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=4096)
    args = parser.parse_args()
    from vlforge.launch.local import free_port

    params = args.layers * (args.width * args.width + args.width)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        rows = []
        for layout in ("ddp", "fsdp"):  # fresh processes each: RSS counts from an empty process
            spawn_args = (free_port(), layout, args.layers, args.width, folder)
            mp.spawn(worker, args=spawn_args, nprocs=2, join=True)
            rows.append(json.loads(Path(folder, f"{layout}.json").read_text()))
    gb = 1e9
    print(f"{params / 1e6:.0f}M parameters, AdamW, 2 CPU ranks (gloo); rank 0's figures")
    for row in rows:
        share, empty = row["share_bytes"], row["rss_empty"]

        def times(peak: int, share=share, empty=empty) -> str:
            return f"{(peak - empty) / share:.2f}x share"

        print(f"\n{row['layout']}: rank 0's share {share / gb:.2f} GB (RSS counted above the empty process)")
        for name in ("legacy", "dcp"):
            if name not in row:
                continue
            r = row[name]
            print(
                f"  {name:<7} save {r['save_s']:6.2f} s (peak RSS {times(r['save_peak_rss'])})  "
                f"load {r['load_s']:6.2f} s (peak RSS {times(r['load_peak_rss'])})  "
                f"written by rank 0: {r['bytes_rank0'] / gb:.2f} GB"
                + (f", rank 1: {r['bytes_rank1'] / gb:.2f} GB" if "bytes_rank1" in r else "")
            )
        a = row["dcp_async"]
        print(
            f"  async   training blocked {a['blocked_s']:6.2f} s, "
            f"committed after {a['until_commit_s']:6.2f} s (peak RSS {times(a['save_peak_rss'])})"
        )
    for row in rows:  # the ratios printed above, recorded too
        for name in ("legacy", "dcp", "dcp_async"):
            for key in [k for k in row.get(name, {}) if k.endswith("peak_rss")]:
                ratio = (row[name][key] - row["rss_empty"]) / row["share_bytes"]
                row[name][key.replace("peak_rss", "peak_over_share")] = round(ratio, 3)
    result = {"parameters": params, "ranks": 2, "device": "cpu", "rows": rows}
    record("checkpoint", result)


if __name__ == "__main__":
    main()
