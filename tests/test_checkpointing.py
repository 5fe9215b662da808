"""``gradient_checkpointing`` on timm.vit, hf.text, albef.fusion, flamingo.perceiver: same gradients."""

from __future__ import annotations

import pytest
import torch

from vlforge.components import BuildContext
from vlforge.model import Progress, build_model
from vlforge.plan import SavedTensorBytes, planned_batches
from vlforge.recipe import load_recipe

from .conftest import REPO


def gradients_and_saved_bytes(name: str, key: str, on: bool) -> tuple[dict[str, torch.Tensor], int]:
    """One training forward/backward of a tiny recipe with ``key.gradient_checkpointing = on``."""
    overrides = ["train.batch_size=8", f"{key}.gradient_checkpointing={'true' if on else 'false'}"]
    recipe, plugins = load_recipe(str(REPO / "recipes" / f"{name}.toml"), overrides, ())
    torch.manual_seed(0)
    model = build_model(recipe, plugins, BuildContext(recipe))
    torch.manual_seed(1)
    batches = planned_batches(model, recipe, 8)  # real tensors on CPU: zeros, then random values
    batch = next(iter(batches.values()))
    batch = {
        k: (torch.randint(0, 8, v.shape) if v.dtype == torch.long else torch.randn(v.shape))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in batch.items()
    }
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    if "labels" in batch:
        batch["labels"] = batch["input_ids"].clone()
    model.train()
    torch.manual_seed(2)
    with SavedTensorBytes(model) as saved:
        loss, _ = model(batch, Progress(total_steps=1))
    loss.backward()
    part = key.split(".")[-1]
    grads = {n: p.grad.clone() for n, p in getattr(model, part).named_parameters() if p.grad is not None}
    return grads, saved.total


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("flip_tiny", "model.vision"),
        ("flip_tiny", "model.text"),
        ("albef_tiny", "model.fusion"),
        ("flamingo_tiny", "model.adapter"),
    ],
)
def test_checkpointing_gives_the_same_gradients_and_saves_fewer_bytes(name, key):
    plain, plain_bytes = gradients_and_saved_bytes(name, key, on=False)
    checkpointed, checkpointed_bytes = gradients_and_saved_bytes(name, key, on=True)
    assert plain and plain.keys() == checkpointed.keys()
    for param, grad in plain.items():
        torch.testing.assert_close(checkpointed[param], grad, rtol=1e-5, atol=1e-7, msg=param)
    assert checkpointed_bytes < plain_bytes
