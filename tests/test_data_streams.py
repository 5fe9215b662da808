"""Sharded train streams: split over ranks and workers, exact resume, bad data, mixing."""

from __future__ import annotations

import itertools
import json
import tarfile
from pathlib import Path

import pytest

from vlforge import data
from vlforge.components import BuildContext
from vlforge.data.mix import MixStream
from vlforge.data.pack import pack, write_shapes_folder
from vlforge.data.sharded import BadDataError, Position, reader_items
from vlforge.data.tar import BadShard, TarWriter, read_samples
from vlforge.errors import UserError

SHARDS, PER_SHARD = 8, 5


class FakeVision:
    data_config = {
        "input_size": (3, 16, 16),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bilinear",
    }


def webdataset(urls, **options):
    ctx = BuildContext(recipe=None, parts={"vision": FakeVision()})
    return data.build_webdataset(data.WebDatasetConfig(urls=urls, **options), ctx)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """8 shards of 5 generated samples; returns the brace pattern naming them."""
    root = tmp_path_factory.mktemp("data")
    write_shapes_folder(root / "images", SHARDS * PER_SHARD, image_size=16)
    pack(str(root / "images"), str(root / "shards"), shard_size=PER_SHARD, progress=False)
    return f"{root}/shards/{{00000..{SHARDS - 1:05d}}}.tar"


def all_keys(pattern: str) -> set[str]:
    return {s["__key__"] for url in data.urls.expand_urls(pattern) for s in read_samples(url)}


def keys_of(stream, batches: int) -> list[list[str]]:
    return [stream.next()["keys"] for _ in range(batches)]


# --------------------------------------------------------------------------- splitting


def test_each_epoch_is_split_disjoint_and_complete_over_2_ranks_x_2_workers(shards):
    source = webdataset(shards, shuffle_block=3)
    shares = {}
    for epoch in (0, 1):
        per_reader = []
        for reader in range(4):  # reader = rank * 2 + worker
            items = reader_items(source, reader, 4, Position(epoch), seed=7)
            in_epoch = itertools.takewhile(lambda pair, e=epoch: pair[0].epoch == e, items)
            per_reader.append([raw["__key__"] for _, raw in in_epoch])
        flat = [key for keys in per_reader for key in keys]
        assert len(flat) == len(set(flat)) == SHARDS * PER_SHARD  # disjoint, nothing twice
        assert set(flat) == all_keys(shards)  # complete
        shares[epoch] = [sorted(keys) for keys in per_reader]
    assert shares[0] != shares[1]  # shards are reshuffled every epoch


def test_streams_of_two_ranks_with_two_workers_cover_the_epoch_once(shards):
    seen = []
    for rank in (0, 1):
        stream = webdataset(shards).train_stream(
            micro_batch=5, seed=1, num_workers=2, rank=rank, world_size=2
        )
        seen += [key for keys in keys_of(stream, 4) for key in keys]  # 20 samples per rank per epoch
        assert stream.epoch == 0
    assert len(seen) == len(set(seen)) and set(seen) == all_keys(shards)


def test_more_readers_than_shards_is_refused(shards):
    with pytest.raises(ValueError, match="cannot be split over 16 readers"):
        webdataset(shards).train_stream(micro_batch=2, seed=0, num_workers=8, rank=0, world_size=2)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_yields_exactly_the_uninterrupted_batches(shards, num_workers):
    options = {"micro_batch": 3, "seed": 3, "num_workers": num_workers, "rank": 0, "world_size": 1}
    reference = keys_of(webdataset(shards, shuffle_block=4).train_stream(**options), 18)  # > 1 epoch

    first = webdataset(shards, shuffle_block=4).train_stream(**options)
    before = keys_of(first, 7)  # mid-shard, mid-block; the workers have read ahead by now
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    resumed = webdataset(shards, shuffle_block=4).train_stream(**options)
    resumed.load_state_dict(state)
    assert before + keys_of(resumed, 11) == reference
    assert resumed.epoch == 1 and resumed.counts["samples"] == 18 * 3


def test_resume_with_another_worker_count_restarts_the_epoch(shards, caplog):
    stream = webdataset(shards).train_stream(micro_batch=4, seed=0, num_workers=2, rank=0, world_size=1)
    keys_of(stream, 3)
    state = stream.state_dict()
    other = webdataset(shards).train_stream(micro_batch=4, seed=0, num_workers=1, rank=0, world_size=1)
    other.load_state_dict(state)
    assert other.positions == [Position(0, 0, 0)] and "restart at the beginning of epoch 0" in caplog.text


# --------------------------------------------------------------------------- bad data


@pytest.fixture(scope="module")
def damaged(shards, tmp_path_factory) -> tuple[list[str], int]:
    """[good, bad samples, truncated, missing, good] shard URLs and how many good samples they hold."""
    root = tmp_path_factory.mktemp("damaged")
    good = data.urls.expand_urls(shards)
    bad = root / "bad.tar"
    with bad.open("wb") as stream:
        writer = TarWriter(stream)
        for sample in read_samples(good[1]):
            writer.write(sample)
        writer.write({"__key__": "broken-image", "jpg": b"\xff\xd8 not really a jpeg", "txt": "x"})
        writer.write({"__key__": "no-caption", "jpg": sample["jpg"]})
        writer.write({"__key__": "no-image", "txt": "a caption alone"})
        writer.close()
    with tarfile.open(good[2]) as archive:
        third_image = archive.getmembers()[6]  # members go jpg, json, txt per sample
    truncated = root / "truncated.tar"
    truncated.write_bytes(Path(good[2]).read_bytes()[: third_image.offset_data + third_image.size // 2])
    survivors = 0
    with pytest.raises(BadShard):
        for _ in read_samples(str(truncated)):
            survivors += 1
    urls = [good[0], str(bad), str(truncated), str(root / "missing.tar"), good[3]]
    return urls, 3 * PER_SHARD + survivors


def test_bad_samples_and_shards_are_skipped_and_counted(damaged):
    urls, good_samples = damaged
    lenient = {"max_skipped_fraction": 1.0, "max_failed_shard_fraction": 1.0}
    source = webdataset(urls, shuffle=False, bad_data=lenient)
    stream = source.train_stream(micro_batch=1, seed=0, num_workers=0, rank=0, world_size=1)
    keys = [key for batch in keys_of(stream, good_samples) for key in batch]
    assert len(set(keys)) == good_samples and not {"broken-image", "no-caption", "no-image"} & set(keys)
    metrics = {}
    source.vlforge_log(metrics=metrics)  # the hook the engine calls before writing metrics
    assert {k: v for k, v in metrics.items() if k != "data/skipped_fraction"} == {
        "data/samples": good_samples,
        "data/shards": 5,  # the last sample of a shard finishes it
        "data/skipped_undecodable": 1,
        "data/skipped_missing_caption": 1,
        "data/skipped_missing_image": 1,
        "data/shards_truncated": 1,
        "data/shards_unreachable": 1,
    }
    assert metrics["data/skipped_fraction"] == pytest.approx(3 / (good_samples + 3))


def test_too_much_bad_data_stops_the_run_with_a_clear_message(damaged):
    urls, _ = damaged
    strict = {"max_skipped_fraction": 0.05, "max_failed_shard_fraction": 1.0, "min_samples": 5}
    stream = webdataset(urls, shuffle=False, bad_data=strict).train_stream(
        micro_batch=4, seed=0, num_workers=0, rank=0, world_size=1
    )
    with pytest.raises(BadDataError, match=r"max_skipped_fraction = 0.05\).*skipped_undecodable 1"):
        keys_of(stream, 10)
    by_shards = {"max_skipped_fraction": 1.0, "max_failed_shard_fraction": 0.2, "min_samples": 5}
    stream = webdataset(urls, shuffle=False, bad_data=by_shards).train_stream(
        micro_batch=4, seed=0, num_workers=0, rank=0, world_size=1
    )
    with pytest.raises(BadDataError, match=r"2 of 4 shards.*shards_truncated 1, shards_unreachable 1"):
        keys_of(stream, 10)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_epoch_length_without_sizes_passes_over_a_bad_first_shard(shards, tmp_path, caplog, damage):
    good = data.urls.expand_urls(shards)
    first = tmp_path / "00000.tar"
    if damage == "truncated":
        first.write_bytes(Path(good[0]).read_bytes()[:3000])
    urls = [str(first), *good[1:]]  # no sizes.json beside tmp_path's first shard
    lenient = {"max_failed_shard_fraction": 1.0}
    source = webdataset(urls, shuffle=False, bad_data=lenient)
    assert source.num_samples() == SHARDS * PER_SHARD  # the second shard counted, times 8
    assert f"cannot count {first} for the epoch length" in caplog.text
    assert f"no usable sizes.json beside {first}; estimating 5 samples per shard" in caplog.text
    stream = source.train_stream(micro_batch=5, seed=0, num_workers=0, rank=0, world_size=1)
    keys = [key for batch in keys_of(stream, SHARDS - 1) for key in batch]
    assert set(keys) >= {s["__key__"] for url in good[1:] for s in read_samples(url)}  # nothing else lost
    assert stream.metrics()[f"data/shards_{'unreachable' if damage == 'missing' else 'truncated'}"] == 1


def test_sizes_json_lacking_a_shard_estimates_only_that_one(shards, tmp_path, caplog):
    folder = Path(data.urls.expand_urls(shards)[0]).parent
    sizes = json.loads((folder / "sizes.json").read_text())
    for name in sizes:
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    sizes["00001.tar"] = 9  # a known, different size is used as it is
    del sizes["00003.tar"]
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    source = webdataset(f"{tmp_path}/{{00000..{SHARDS - 1:05d}}}.tar")
    mean = (9 + 6 * PER_SHARD) / 7
    assert source.num_samples() == round(9 + 6 * PER_SHARD + mean)
    assert f"{tmp_path}/sizes.json lacks 1 of the 8 shards (00003.tar)" in caplog.text
    assert "no usable sizes.json" not in caplog.text


def test_data_that_never_yields_a_sample_fails_instead_of_spinning(tmp_path):
    stream = webdataset([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]).train_stream(
        micro_batch=2, seed=0, num_workers=0, rank=0, world_size=1
    )
    with pytest.raises(BadDataError, match="no usable sample in a whole epoch"):
        stream.next()


# --------------------------------------------------------------------------- mixing


class CountingStream:
    """A stand-in TrainStream: batch i of source ``name`` is {"i": i}."""

    def __init__(self, name: str) -> None:
        self.name, self.taken, self.epoch = name, 0, 0

    def next(self) -> dict:
        self.taken += 1
        return {"i": self.taken - 1}

    def batches_per_epoch(self) -> int:
        return 10

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = state["taken"]


def mix(mode: str = "sample", weights=(3.0, 1.0)) -> MixStream:
    return MixStream(["a", "b"], [CountingStream("a"), CountingStream("b")], list(weights), mode, seed=5)


def test_mix_draws_sources_by_weight_within_tolerance():
    stream = mix()
    names = [stream.next()["dataset"] for _ in range(4000)]
    assert names.count("a") / len(names) == pytest.approx(0.75, abs=0.03)  # ~4 sd of a binomial
    again = mix()
    assert [again.next()["dataset"] for _ in range(50)] == names[:50]  # same seed, same draws
    assert stream.batches_per_epoch() == 40  # source b: 10 batches at a quarter share


def test_mix_cycle_takes_sources_in_turn_and_resumes():
    stream = mix("cycle")
    first = [(b["dataset"], b["i"]) for b in (stream.next() for _ in range(5))]
    assert first == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]
    resumed = mix("cycle")
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    assert [(b["dataset"], b["i"]) for b in (resumed.next() for _ in range(2))] == [("b", 2), ("a", 3)]


def test_mix_builds_its_sources_and_names_their_bad_keys(shards, monkeypatch):
    monkeypatch.setenv("VLFORGE_DISABLE_PLUGIN_AUTOLOAD", "1")
    ctx = BuildContext(recipe=None, parts={"vision": FakeVision()})
    config = data.MixConfig(
        sources={
            "big": {"type": "webdataset", "urls": shards, "weight": 4.0},
            "small": {"type": "webdataset", "urls": shards, "micro_batch": 2, "shuffle": False},
        }
    )
    source = data.build_mix(config, ctx)
    stream = source.train_stream(micro_batch=4, seed=0, num_workers=0, rank=0, world_size=1)
    batches = [stream.next() for _ in range(20)]
    taken = {name: sum(batch["dataset"] == name for batch in batches) for name in ("big", "small")}
    assert taken["big"] > taken["small"] > 0
    assert {len(batch["keys"]) for batch in batches if batch["dataset"] == "small"} == {2}
    assert {len(batch["keys"]) for batch in batches if batch["dataset"] == "big"} == {4}
    metrics = {}
    source.vlforge_log(metrics=metrics)
    assert (
        metrics["data/big/samples"] == 4 * taken["big"]
        and metrics["data/small/samples"] == 2 * taken["small"]
    )
    bad = data.MixConfig(sources={"x": {"type": "webdataset", "urlz": shards}})
    with pytest.raises(UserError, match=r"data.sources.x.urlz: Extra inputs are not permitted"):
        data.build_mix(bad, ctx)
