"""Data position across a change of world size (map-style sources): the epoch goes on.

Ranks at world 2 consume part of an epoch; the position is resumed at world 1, 3 and 4. The
samples seen before and after hold no duplicate, and miss only the tail an epoch drops anyway
(fewer than the new world size).
"""

from __future__ import annotations

import pytest

from vlforge.data.sampler import ResumableSampler


def consume(sampler: ResumableSampler, count: int) -> list[int]:
    taken = []
    for index in sampler:
        taken.append(index)
        if len(taken) == count:
            break
    return taken


@pytest.mark.parametrize("new_world", [1, 2, 3, 4])
def test_an_epoch_resumed_at_another_world_size_has_no_repeat_and_no_gap(new_world):
    size, old_world, per_rank = 103, 2, 20
    old = [ResumableSampler(range(size), seed=3, rank=r, world_size=old_world) for r in range(old_world)]
    before = [i for sampler in old for i in consume(sampler, per_rank)]
    states = [sampler.state_dict(consumed=per_rank) for sampler in old]

    after = []
    for rank in range(new_world):
        sampler = ResumableSampler(range(size), seed=3, rank=rank, world_size=new_world)
        sampler.load_state_dict(states[0])  # any rank's position says where the epoch stands
        after += list(sampler)
    seen = before + after
    assert len(seen) == len(set(seen))  # nothing repeated
    missed = set(range(size)) - set(seen)
    assert len(missed) < new_world  # only the tail cut for equal counts per rank
    if new_world == old_world:
        whole = [
            i for r in range(old_world) for i in ResumableSampler(range(size), seed=3, rank=r, world_size=2)
        ]
        assert sorted(seen) == sorted(whole)


def test_a_resumed_position_goes_back_to_full_epochs_afterwards():
    sampler = ResumableSampler(range(40), seed=1, rank=0, world_size=3)
    sampler.load_state_dict({"epoch": 0, "index": 5, "dealt_from": 0, "world_size": 2})
    assert sampler.dealt_from == 10 and len(sampler) == 10  # (40 - 10) // 3
    sampler.set_epoch(1)
    assert sampler.dealt_from == 0 and len(sampler) == 13
