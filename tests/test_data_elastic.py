"""Data position across a change of world size (map-style sources): the epoch goes on.

Ranks at world 2 consume part of an epoch; the position is resumed at world 1, 3 and 4. The
samples seen before and after hold no duplicate, and miss only the tail an epoch drops anyway
(fewer than the new world size).
"""

from __future__ import annotations

import itertools

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


# --------------------------------------------------------------------------- sharded sources


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """8 webdataset shards of 5 generated samples; the brace pattern naming them."""
    from vlforge.data.pack import pack, write_shapes_folder

    root = tmp_path_factory.mktemp("elastic")
    write_shapes_folder(root / "images", 40, image_size=16)
    pack(str(root / "images"), str(root / "shards"), shard_size=5, progress=False)
    return f"{root}/shards/{{00000..00007}}.tar"


def webdataset(pattern: str):
    from vlforge import data
    from vlforge.components import BuildContext

    from .test_data_streams import FakeVision

    return data.build_webdataset(
        data.WebDatasetConfig(urls=pattern, shuffle_block=3),
        BuildContext(recipe=None, parts={"vision": FakeVision()}),
    )


@pytest.mark.parametrize(("new_world", "new_workers"), [(1, 3), (3, 2)])
def test_a_webdataset_epoch_resumed_at_another_world_size_has_no_repeat_and_no_gap(
    shards, new_world, new_workers
):
    from vlforge.data.sharded import LEFTOVER, reader_items

    source = webdataset(shards)
    old = [source.train_stream(micro_batch=2, seed=4, num_workers=2, rank=r, world_size=2) for r in range(2)]
    before = [key for stream in old for _ in range(3) for key in stream.next()["keys"]]  # 12 of 40
    saved = [stream.state_dict() for stream in old]

    after, first_batches = [], []
    for rank in range(new_world):
        stream = webdataset(shards).train_stream(
            micro_batch=2, seed=4, num_workers=new_workers, rank=rank, world_size=new_world
        )
        stream.load_state_dict({**saved[0], "every_rank": saved})
        assert stream.epoch == 0 and stream.resume_epoch == 1
        for local in range(new_workers):  # every reader's leftover samples, in its order
            reader = rank * new_workers + local
            items = reader_items(
                source, reader, new_world * new_workers, stream.positions[local], 4, stream.leftover[local], 1
            )
            in_leftover = itertools.takewhile(lambda pair: pair[0].epoch == LEFTOVER, items)
            after += [raw["__key__"] for _, raw in in_leftover]
        first_batches += stream.next()["keys"]  # through the DataLoader workers
    seen = before + after
    assert len(seen) == len(set(seen)) == 40  # the whole epoch once: no repeat, no gap
    assert set(first_batches) <= set(after)  # the resumed streams start on the leftovers
