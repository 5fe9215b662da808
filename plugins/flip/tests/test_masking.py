"""flip.random: token counts, CLS kept, subset and uniformity, seeding, unmasked tuning (methods.md §3.8)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from vlforge_plugins.flip import RandomMaskingConfig
from vlforge_plugins.flip.masking import RandomMasking, StepGenerator, keep_count

from vlforge.encoders import TimmViTConfig
from vlforge.encoders.vision import build_timm_vit
from vlforge.model import Progress

# methods.md §3.8: width 32, depth 2, image 64, patch 8 -> N = 64 patches + 1 CLS.
TINY_VIT = TimmViTConfig(
    model="vit_tiny_patch16_224", img_size=64, patch_size=8, width=32, depth=2, heads=2, embed_dim=16
)


def masking(ratio: float, seed: int = 0, **schedule) -> RandomMasking:
    return RandomMasking(ratio, StepGenerator(seed, "test"), **schedule)


def start_step(module: RandomMasking, step: int, samples_seen: int = 0, rank: int = 0) -> None:
    """What the engine does at each step start (the module's own hook implementation)."""
    progress = Progress(step=step, samples_seen=samples_seen)
    module.vlforge_step_start(SimpleNamespace(progress=progress, rank=rank, step=step))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_timm_vit(TINY_VIT)


@pytest.fixture(scope="module")
def tokens(vit) -> torch.Tensor:
    """(8, 65, 32): the encoder's real token stage output (patches + position, CLS first)."""
    with torch.no_grad():
        return vit.embed(torch.randn(8, 3, 64, 64))


def indexed_tokens(batch: int, patches: int) -> torch.Tensor:
    """(B, 1+N, 1): CLS = -1, patch i = i, so kept rows name their own index."""
    values = torch.cat([torch.full((1,), -1.0), torch.arange(patches, dtype=torch.float32)])
    return values.repeat(batch, 1)[..., None]


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("patches", "ratio", "kept"),
    [(64, 0.5, 32), (64, 0.75, 16), (196, 0.5, 98), (196, 0.75, 49), (256, 0.5, 128), (256, 0.75, 64)],
)
def test_keep_count_examples(patches, ratio, kept):
    assert keep_count(patches, ratio) == kept


def test_keep_count_is_exact_where_float_floor_is_not():
    assert int(100 * (1 - 0.9)) == 9 and int(50 * (1 - 0.9)) == 4  # the float pitfall
    assert keep_count(100, 0.9) == 10 and keep_count(50, 0.9) == 5
    assert keep_count(4, 0.99) == 1  # at least one token survives


@pytest.mark.parametrize(("ratio", "length"), [(0.0, 65), (0.5, 33), (0.75, 17)])
def test_encoder_sees_k_plus_one_tokens_in_training(vit, ratio, length):
    vit.train()
    out = vit(torch.randn(2, 3, 64, 64), masking=masking(ratio))
    assert out.tokens.shape == (2, length, 32)
    assert out.embedding.shape == (2, 16)


def test_eval_mode_sees_every_token(vit, tokens):
    module = masking(0.75).eval()
    assert module(tokens, 1) is tokens
    vit.eval()
    assert vit(torch.randn(2, 3, 64, 64), masking=module).tokens.shape == (2, 65, 32)


def test_ratio_zero_is_the_identity(tokens):
    assert masking(0.0).train()(tokens, 1) is tokens


# --------------------------------------------------------------------------- which tokens


def test_cls_token_is_kept_bitwise(tokens):
    out = masking(0.5).train()(tokens, 1)
    assert torch.equal(out[:, 0], tokens[:, 0])


def test_kept_rows_are_a_duplicate_free_subset_of_the_patch_rows(tokens):
    out = masking(0.5).train()(tokens, 1)  # (8, 33, 32)
    index_sets = []
    for sample in range(tokens.shape[0]):
        # Each kept row must equal exactly one original patch row (patch + its position embedding).
        matches = (out[sample, 1:, None, :] == tokens[sample, None, 1:, :]).all(-1)  # (32, 64)
        assert (matches.sum(1) == 1).all()
        index = matches.float().argmax(1)
        assert index.unique().numel() == 32  # no duplicates
        index_sets.append(tuple(index.tolist()))
    assert len(set(index_sets)) == len(index_sets)  # every image draws its own subset


def test_prefix_tokens_are_never_dropped():
    batch = indexed_tokens(4, 16)
    batch[:, 1] = -2.0  # a second prefix token (e.g. a register)
    out = masking(0.75).train()(batch, 2)
    assert out.shape == (4, 2 + 3, 1)  # P = 2 kept, K = floor(15 * 0.25) = 3 patches
    assert (out[:, :2, 0] == torch.tensor([-1.0, -2.0])).all()
    assert (out[:, 2:] >= 0).all()


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_each_patch_is_kept_with_frequency_one_minus_ratio(ratio):
    draws, patches = 10_000, 64
    out = masking(ratio, seed=1).train()(indexed_tokens(draws, patches), 1)  # 10,000 draws at once
    counts = torch.bincount(out[:, 1:, 0].long().flatten(), minlength=patches)
    frequency = counts.float() / draws
    assert frequency.sum() == pytest.approx(keep_count(patches, ratio))
    assert (frequency - (1 - ratio)).abs().max() < 0.02


def test_gradients_reach_only_the_kept_tokens(tokens):
    leaf = tokens.clone().requires_grad_(True)
    masking(0.5).train()(leaf, 1).sum().backward()
    touched = (leaf.grad != 0).any(-1)  # (8, 65)
    assert touched[:, 0].all() and (touched[:, 1:].sum(1) == 32).all()


# --------------------------------------------------------------------------- seeding


def test_same_seed_same_masks_other_seed_other_masks(tokens):
    first = masking(0.5, seed=7).train()(tokens, 1)
    again = masking(0.5, seed=7).train()(tokens, 1)
    other = masking(0.5, seed=8).train()(tokens, 1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_masks_of_a_step_depend_only_on_seed_rank_and_step(tokens):
    """Exact resume: a fresh module at step 5 draws what a long-running one draws at step 5."""
    running = masking(0.5).train()
    for step in range(5):
        start_step(running, step)
        running(tokens, 1)
        running(tokens, 1)  # a second micro-batch
    start_step(running, 5)
    resumed = masking(0.5).train()
    start_step(resumed, 5)
    assert torch.equal(running(tokens, 1), resumed(tokens, 1))
    start_step(resumed, 5, rank=1)
    start_step(running, 5)
    assert not torch.equal(running(tokens, 1), resumed(tokens, 1))  # ranks draw differently


def test_micro_batches_of_one_step_draw_different_masks(tokens):
    module = masking(0.5).train()
    start_step(module, 3)
    assert not torch.equal(module(tokens, 1), module(tokens, 1))


# --------------------------------------------------------------------------- unmasked tuning


def test_unmasked_tuning_switches_at_the_given_step():
    module = masking(0.5, unmasked_from_step=3)
    ratios = []
    for step in range(5):
        start_step(module, step)
        ratios.append(module.active_ratio)
    assert ratios == [0.5, 0.5, 0.5, 0.0, 0.0]


def test_unmasked_tuning_switches_at_the_step_that_reaches_the_sample_count():
    module = masking(0.75, unmasked_from_samples=300)
    ratios = []
    for step in range(5):
        start_step(module, step, samples_seen=128 * step)  # 0, 128, 256, 384, 512
        ratios.append(module.active_ratio)
    assert ratios == [0.75, 0.75, 0.75, 0.0, 0.0]


def test_switched_module_matches_one_built_unmasked(vit):
    """methods.md §3.8 check 9: after the switch the encoder output equals an unmasked forward."""
    module = masking(0.5, unmasked_from_step=1)
    images = torch.randn(2, 3, 64, 64)
    vit.train()
    start_step(module, 0)
    assert vit(images, masking=module).tokens.shape[1] == 33
    start_step(module, 1)
    assert torch.equal(vit(images, masking=module).tokens, vit(images, masking=masking(0.0)).tokens)


def test_config_refuses_two_switches_and_a_full_mask():
    with pytest.raises(ValidationError, match="at most one"):
        RandomMaskingConfig(unmasked_from_step=10, unmasked_from_samples=1000)
    with pytest.raises(ValidationError, match="less than 1"):
        RandomMaskingConfig(ratio=1.0)
