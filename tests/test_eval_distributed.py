"""Evaluation on every rank: 2 real gloo ranks return exactly what one process returns.

Retrieval, zero-shot, ALBEF's ITM re-ranking and Flamingo's few-shot generation (captioning, VQA
on generated shapes and on a VQA file) each split their work over the ranks (whole batches, one
rank padding) and gather it (``vlforge.eval.shards``); the metrics must be equal, not merely close.
"""

from __future__ import annotations

import importlib
import socket
from pathlib import Path

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_rank(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    worker = importlib.import_module("eval_dist_worker")
    worker.write_vqa_file(tmp_path)
    for world in (1, 2):
        mp.spawn(worker.run, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    one = torch.load(tmp_path / "world1_rank0.pt")
    two = [torch.load(tmp_path / f"world2_rank{rank}.pt") for rank in range(2)]
    assert set(one) == {"clip", "albef", "flamingo"}
    assert set(one["clip"]) == {"retrieval", "zeroshot", "shape", "whole"}
    assert {"itm_i2t_r1", "itm_t2i_r10", "i2t_r1"} <= set(one["albef"]["retrieval"])
    assert {"0shot_accuracy", "2shot_accuracy"} <= set(one["flamingo"]["vqa"])
    assert {"0shot_cider", "2shot_cider"} <= set(one["flamingo"]["caption"])
    assert set(one["flamingo"]["vqav2"]) == {"0shot_vqa_accuracy", "2shot_vqa_accuracy", "skipped_lines"}
    assert two[0] == one  # every metric of every evaluator, exactly
    assert two[1] == one  # and every rank returns it
