"""Retrieval and zero-shot evaluators, with stand-in models of known quality."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from vlforge import data
from vlforge import eval as evaluators
from vlforge.components import BuildContext
from vlforge.data.synthetic import ATTRIBUTES
from vlforge.data.tokenizers import load_tokenizer
from vlforge.eval.retrieval import KS, chance_r1, retrieval_metrics
from vlforge.registry import Registry

SPLIT_SIZE = 256


class FakeVision:
    data_config = {"input_size": (3, 24, 24), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


class FakeText:
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = load_tokenizer("vlforge:shapes")(texts, padding=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def labels_of(text: str, attributes: list[str]) -> dict[str, int]:
    """The value ``text`` names for each of ``attributes`` (captions name one of each)."""
    return {
        name: next(i for i, value in enumerate(ATTRIBUTES[name]) if re.search(rf"\b{value}\b", text))
        for name in attributes
    }


class OracleModel(nn.Module):
    """Embeds images and texts as the one-hot of the ``attributes`` they show or name.

    It knows images by heart: ``images`` maps a normalised image's bytes to its
    labels, filled from the split the evaluator will read.
    """

    def __init__(self, attributes: list[str], images: dict[bytes, dict[str, int]]) -> None:
        super().__init__()
        self.attributes = attributes
        self.images = images
        self.dims = [len(ATTRIBUTES[name]) for name in attributes]
        self.modes_seen: set[bool] = set()

    def one_hot(self, labels: list[dict[str, int]]) -> torch.Tensor:
        keys = [np.ravel_multi_index([lab[name] for name in self.attributes], self.dims) for lab in labels]
        return F.one_hot(torch.tensor(keys), int(np.prod(self.dims))).float()  # (B, E)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.modes_seen.add(self.training)
        return self.one_hot([self.images[image.numpy().tobytes()] for image in images])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokenizer = load_tokenizer("vlforge:shapes")
        texts = tokenizer.batch_decode(input_ids * attention_mask, skip_special_tokens=True)
        return self.one_hot([labels_of(text, self.attributes) for text in texts])


class RandomModel(nn.Module):
    """Embeddings unrelated to the input."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.generator = torch.Generator().manual_seed(0)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.randn(len(images), self.dim, generator=self.generator), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.randn(len(input_ids), self.dim, generator=self.generator), dim=-1)


@pytest.fixture(scope="module")
def ctx() -> BuildContext:
    ctx = BuildContext(recipe=None, parts={"vision": FakeVision(), "text": FakeText()})
    ctx.parts["data"] = data.build_shapes(data.ShapesConfig(val_size=SPLIT_SIZE, test_size=SPLIT_SIZE), ctx)
    return ctx


def oracle(ctx: BuildContext, attributes: list[str], split: str = "val") -> OracleModel:
    source = ctx.parts["data"]
    dataset = source.dataset(split)
    images = {}
    for start in range(0, len(dataset), 64):
        batch = source.collate([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
        for i, image in enumerate(batch["images"]):
            images[image.numpy().tobytes()] = {name: int(batch["labels"][name][i]) for name in ATTRIBUTES}
    return OracleModel(attributes, images)


def build(kind_name: str, ctx: BuildContext, **options):
    registry = Registry()
    evaluators.register(registry)
    component = registry.get("evaluator", kind_name)
    return component.factory(component.config(**options), ctx)


# --------------------------------------------------------------------------- retrieval


def test_retrieval_of_a_perfect_model_is_perfect(ctx: BuildContext) -> None:
    model = oracle(ctx, list(ATTRIBUTES), split="test")
    metrics = build("retrieval", ctx, split="test", batch_size=100).evaluate(model, ctx)
    chances = {"i2t_chance_r1", "t2i_chance_r1"}
    expected_keys = {f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS} | chances
    assert set(metrics) == expected_keys
    assert all(metrics[key] == 1.0 for key in expected_keys - chances)
    assert 0 < metrics["i2t_chance_r1"] == metrics["t2i_chance_r1"] < 0.05
    assert all(isinstance(value, float) for value in metrics.values())


def test_retrieval_counts_only_the_same_image(ctx: BuildContext) -> None:
    # Right about the shape alone: the top text shows the right shape but rarely the rest.
    metrics = build("retrieval", ctx).evaluate(oracle(ctx, ["shape"]), ctx)
    assert metrics["i2t_r1"] < 0.1 and metrics["t2i_r1"] < 0.1


def test_retrieval_of_a_random_model_is_near_chance(ctx: BuildContext) -> None:
    metrics = build("retrieval", ctx).evaluate(RandomModel(), ctx)
    chance = metrics["i2t_chance_r1"]
    for direction in ("i2t", "t2i"):
        assert metrics[f"{direction}_r1"] <= metrics[f"{direction}_r5"] <= metrics[f"{direction}_r10"]
        assert abs(metrics[f"{direction}_r1"] - chance) < 0.02
        assert metrics[f"{direction}_r10"] < 0.15


def test_chance_counts_items_of_one_image_id_as_matches() -> None:
    image_ids = ["a", "a", "b", "c", "c", "c", "d", "e"]
    expected = (2 * 2 + 1 + 3 * 3 + 1 + 1) / 8 / 8
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    assert chance_r1(ids, ids) == pytest.approx(expected)
    # ...and is what random embeddings score on average.
    generator = torch.Generator().manual_seed(0)
    scores = []
    for _ in range(400):
        images, texts = (F.normalize(torch.randn(8, 4, generator=generator), dim=-1) for _ in range(2))
        scores.append(retrieval_metrics(images, image_ids, texts, image_ids)["i2t_r1"])
    assert np.mean(scores) == pytest.approx(expected, abs=0.02)


def test_retrieval_ranks_by_similarity() -> None:
    images = torch.eye(3)
    texts = torch.eye(3)[[1, 0, 2]]  # text 0 looks like image 1, text 1 like image 0
    metrics = retrieval_metrics(images, ["x", "y", "z"], texts, ["x", "y", "z"])
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == pytest.approx(1 / 3)
    assert metrics["i2t_r5"] == 1.0  # fewer than 5 candidates: every one is in the top 5


def test_evaluation_runs_in_eval_mode_and_restores_the_mode(ctx: BuildContext) -> None:
    model = oracle(ctx, ["shape"])
    model.train()
    build("retrieval", ctx, batch_size=128).evaluate(model, ctx)
    assert model.modes_seen == {False} and model.training
    model.eval()
    build("zeroshot", ctx, attribute="shape").evaluate(model, ctx)
    assert not model.training


# --------------------------------------------------------------------------- zero-shot


@pytest.mark.parametrize("attribute", ["shape", "color"])
def test_zeroshot_of_a_perfect_model_is_perfect(ctx: BuildContext, attribute: str) -> None:
    metrics = build("zeroshot", ctx, attribute=attribute).evaluate(oracle(ctx, [attribute]), ctx)
    chance = 1 / len(ATTRIBUTES[attribute])
    assert metrics == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0, "chance_top1": chance}


def test_zeroshot_with_own_templates(ctx: BuildContext) -> None:
    evaluator = build("zeroshot", ctx, attribute="shape", templates=["a {}", "a photo of a {}"])
    assert evaluator.evaluate(oracle(ctx, ["shape"]), ctx)["top1"] == 1.0


def test_zeroshot_of_a_random_model_is_near_chance(ctx: BuildContext) -> None:
    metrics = build("zeroshot", ctx, attribute="color").evaluate(RandomModel(), ctx)
    assert abs(metrics["top1"] - 1 / 8) < 0.08
    assert abs(metrics["top5"] - 5 / 8) < 0.12


def test_zeroshot_config_is_checked() -> None:
    registry = Registry()
    evaluators.register(registry)
    config = registry.get("evaluator", "zeroshot").config
    with pytest.raises(ValidationError, match="no '{}'"):
        config(templates=["a photo of a thing"])
    with pytest.raises(ValidationError, match="at least one template"):
        config(templates=[])
    with pytest.raises(ValidationError, match="atribute"):
        config(atribute="shape")


def test_zeroshot_on_an_unknown_attribute_names_the_valid_ones(ctx: BuildContext) -> None:
    with pytest.raises(ValueError, match="shape, color, position, size"):
        build("zeroshot", ctx, attribute="hue").evaluate(RandomModel(), ctx)
