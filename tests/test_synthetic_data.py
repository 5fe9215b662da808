"""The generated shapes dataset and the resumable sampler."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader

from vlforge import data
from vlforge.components import BuildContext
from vlforge.data.sampler import ResumableSampler
from vlforge.data.synthetic import (
    ATTRIBUTES,
    BACKGROUND,
    CAPTION_TEMPLATES,
    COLORS,
    VOCABULARY,
    ShapesData,
)
from vlforge.data.tokenizers import load_tokenizer
from vlforge.registry import Registry

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class FakeVision:
    data_config = {"input_size": (3, 24, 24), "mean": MEAN, "std": STD}


class FakeText:
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = load_tokenizer("vlforge:shapes")(texts, padding=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def make_data(**options) -> ShapesData:
    ctx = BuildContext(recipe=None, parts={"vision": FakeVision(), "text": FakeText()})
    return data.build_shapes(data.ShapesConfig(**options), ctx)


def labels_in(caption: str) -> dict[str, list[int]]:
    """attribute -> indices of every value named (as whole words) in ``caption``."""
    return {
        name: [i for i, value in enumerate(values) if re.search(rf"\b{value}\b", caption)]
        for name, values in ATTRIBUTES.items()
    }


# --------------------------------------------------------------------------- registration and config


def test_registered_with_defaults() -> None:
    registry = Registry()
    data.register(registry)
    component = registry.get("dataset", "synthetic.shapes")
    config = component.config()
    assert (config.seed, config.train_size, config.val_size, config.test_size) == (0, 20_000, 512, 512)
    assert config.image_size is None
    with pytest.raises(ValidationError, match="colour"):
        component.config(colour=3)


def test_image_size_defaults_to_the_vision_encoder() -> None:
    assert make_data().dataset("val")[0]["image"].shape == (24, 24, 3)
    assert make_data(image_size=40).dataset("val")[0]["image"].shape == (40, 40, 3)


def test_needs_the_encoders() -> None:
    ctx = BuildContext(recipe=None, parts={"vision": FakeVision()})
    with pytest.raises(ValueError, match="text encoder"):
        data.build_shapes(data.ShapesConfig(), ctx)


def test_unknown_split_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="train, val, test"):
        make_data().dataset("validation")


# --------------------------------------------------------------------------- determinism


def assert_same_item(a: dict, b: dict) -> None:
    assert np.array_equal(a["image"], b["image"])
    assert (a["caption"], a["labels"], a["key"]) == (b["caption"], b["labels"], b["key"])


def test_item_is_a_pure_function_of_seed_split_and_index() -> None:
    train = make_data(seed=3).dataset("train")
    first = train[17]
    np.random.seed(123)  # global RNG state must not matter
    torch.manual_seed(123)
    _ = [train[i] for i in range(5)]  # nor the order of access
    assert_same_item(first, train[17])
    assert_same_item(first, make_data(seed=3).dataset("train")[17])


def test_different_seeds_give_different_items() -> None:
    a, b = make_data(seed=0).dataset("train"), make_data(seed=1).dataset("train")
    assert [a[i]["caption"] for i in range(20)] != [b[i]["caption"] for i in range(20)]
    assert not np.array_equal(a[0]["image"], b[0]["image"])


def test_splits_are_separate_streams() -> None:
    source = make_data(train_size=300, val_size=200, test_size=200)
    keys = {split: {item["key"] for item in source.dataset(split)} for split in ("train", "val", "test")}
    assert (
        not keys["train"] & keys["val"]
        and not keys["train"] & keys["test"]
        and not keys["val"] & keys["test"]
    )
    assert [len(k) for k in keys.values()] == [300, 200, 200]
    train, val = source.dataset("train"), source.dataset("val")
    assert [train[i]["labels"] for i in range(20)] != [val[i]["labels"] for i in range(20)]


def test_index_out_of_range() -> None:
    with pytest.raises(IndexError):
        make_data(val_size=4).dataset("val")[4]


# --------------------------------------------------------------------------- captions and images


def test_captions_name_exactly_the_labelled_attributes() -> None:
    source = make_data()
    for split in ("train", "val"):
        for i in range(200):
            item = source.dataset(split)[i]
            named = labels_in(item["caption"])
            assert named == {name: [label] for name, label in item["labels"].items()}, item["caption"]


def canonical_caption(labels: dict[str, int]) -> str:
    return CAPTION_TEMPLATES[0].format(**{name: ATTRIBUTES[name][i] for name, i in labels.items()})


def test_held_out_captions_are_canonical_and_train_captions_vary() -> None:
    source = make_data()
    for split in ("val", "test"):
        items = [source.dataset(split)[i] for i in range(50)]
        assert all(item["caption"] == canonical_caption(item["labels"]) for item in items)
    train = [source.dataset("train")[i] for i in range(50)]
    assert sum(item["caption"] != canonical_caption(item["labels"]) for item in train) > 25


def test_captions_and_prompts_use_only_the_vocabulary() -> None:
    source = make_data()
    vocabulary = set(VOCABULARY)
    captions = [source.dataset("train")[i]["caption"] for i in range(300)]
    prompts = [
        t.format(n) for a in ATTRIBUTES for n in source.class_names(a) for t in source.prompt_templates(a)
    ]
    for text in captions + prompts:
        assert set(text.split()) <= vocabulary, text


def test_tokenizer_round_trips_a_caption() -> None:
    tokenizer = load_tokenizer("vlforge:shapes")
    for caption in {make_data().dataset("train")[i]["caption"] for i in range(50)}:
        ids = tokenizer(caption)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_image_shows_the_shape_in_its_cell_in_its_colour() -> None:
    dataset = make_data(image_size=48, background_noise=0.0).dataset("train")
    cell = 48 // 3
    for i in range(100):
        item = dataset[i]
        drawn = (item["image"] != BACKGROUND).any(axis=-1)  # (H, W)
        ys, xs = np.nonzero(drawn)
        row, col = divmod(item["labels"]["position"], 3)
        assert ys.min() >= row * cell and ys.max() < (row + 1) * cell
        assert xs.min() >= col * cell and xs.max() < (col + 1) * cell
        color = list(COLORS.values())[item["labels"]["color"]]
        assert (item["image"][drawn] == color).all()


def test_large_shapes_cover_more_pixels_than_small_ones() -> None:
    dataset = make_data(image_size=32, background_noise=0.0).dataset("train")
    area = {0: [], 1: []}
    for i in range(300):
        item = dataset[i]
        area[item["labels"]["size"]].append(int((item["image"] != BACKGROUND).any(axis=-1).sum()))
    assert max(area[0]) < min(area[1])


def test_zero_shot_prompts_cover_every_canonical_caption_once() -> None:
    source = make_data()
    for attribute in ATTRIBUTES:
        names, templates = source.class_names(attribute), source.prompt_templates(attribute)
        prompts = [t.format(n) for n in names for t in templates]
        assert len(prompts) == len(set(prompts)) == 6 * 8 * 9 * 2
    with pytest.raises(ValueError, match="shape, color, position, size"):
        source.class_names("hue")


# --------------------------------------------------------------------------- collate


def test_collate_builds_a_normalised_batch() -> None:
    source = make_data()
    items = [source.dataset("train")[i] for i in range(6)]
    batch = source.collate(items)
    assert batch["images"].shape == (6, 3, 24, 24) and batch["images"].dtype == torch.float32
    assert batch["images"].is_contiguous()
    pixels = torch.from_numpy(np.stack([item["image"] for item in items])).permute(0, 3, 1, 2) / 255
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(batch["images"] * std + mean, pixels)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 6
    assert batch["input_ids"].dtype == torch.long
    assert batch["captions"] == [item["caption"] for item in items]
    assert batch["keys"] == [item["key"] for item in items]
    assert set(batch["labels"]) == set(ATTRIBUTES)
    for name, values in batch["labels"].items():
        assert values.dtype == torch.long and values.tolist() == [item["labels"][name] for item in items]


def test_works_in_a_dataloader_with_workers() -> None:
    source = make_data(train_size=64)
    loader = DataLoader(source.dataset("train"), batch_size=16, num_workers=2, collate_fn=source.collate)
    keys = [key for batch in loader for key in batch["keys"]]
    assert keys == [f"train/{i}" for i in range(64)]


# --------------------------------------------------------------------------- sampler


def test_ranks_are_disjoint_equal_and_complete() -> None:
    dataset = range(12)
    per_rank = [list(ResumableSampler(dataset, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in per_rank] == [4, 4, 4]
    assert sorted(i for p in per_rank for i in p) == list(range(12))


def test_the_tail_is_dropped_so_ranks_stay_equal() -> None:
    per_rank = [ResumableSampler(range(11), rank=r, world_size=3) for r in range(3)]
    indices = [list(s) for s in per_rank]
    assert [len(s) for s in per_rank] == [len(i) for i in indices] == [3, 3, 3]
    assert len({i for p in indices for i in p}) == 9


def test_epochs_are_different_permutations_of_the_same_order_per_seed() -> None:
    sampler = ResumableSampler(range(50), seed=1)
    epoch0 = list(sampler)
    assert list(ResumableSampler(range(50), seed=1)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(sampler) == list(range(50))


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_yields_exactly_the_rest_of_the_epoch(world_size: int) -> None:
    for rank in range(world_size):
        full = ResumableSampler(range(40), seed=7, rank=rank, world_size=world_size, epoch=2)
        expected = list(full)
        interrupted = ResumableSampler(range(40), seed=7, rank=rank, world_size=world_size)
        interrupted.set_epoch(2)
        iterator = iter(interrupted)
        seen = [next(iterator) for _ in range(5)]
        state = interrupted.state_dict()
        assert state == {"epoch": 2, "index": 5, "dealt_from": 0, "world_size": world_size}
        resumed = ResumableSampler(range(40), seed=7, rank=rank, world_size=world_size)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the loop re-entering the same epoch keeps the offset
        assert len(resumed) == len(expected) - 5
        assert seen + list(resumed) == expected
        resumed.set_epoch(3)  # the next epoch starts from its beginning
        assert len(list(resumed)) == len(expected)


def test_resume_behind_a_prefetching_dataloader_takes_the_consumed_count() -> None:
    sampler = ResumableSampler(range(64), seed=2)
    expected = list(sampler)
    loader = DataLoader(range(64), batch_size=4, sampler=sampler, num_workers=1)
    trained = []
    for batch in loader:
        trained += batch.tolist()
        if len(trained) == 12:
            break
    assert sampler.state_dict()["index"] > 12  # the loader fetched ahead of the loop
    state = sampler.state_dict(consumed=len(trained))
    resumed = ResumableSampler(range(64), seed=2)
    resumed.load_state_dict(state)
    assert trained + list(resumed) == expected


def test_rank_must_be_below_world_size() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        ResumableSampler(range(4), rank=2, world_size=2)
