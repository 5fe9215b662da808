"""flip.masked_text: FLIP's text-masking ablation, padding dropped first, positions kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vlforge_plugins.flip import MaskedTextConfig, build_masked_text
from vlforge_plugins.flip.text import text_keep_indices

from vlforge.components import BuildContext
from vlforge.encoders import HFTextConfig
from vlforge.encoders.text import build_hf_text

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 24,
    "hidden_dropout_prob": 0.0,  # train and eval forwards comparable
    "attention_probs_dropout_prob": 0.0,
}
# L = 10 with [CLS]/[SEP]: the short caption has 5 real tokens and 5 padding positions.
CAPTIONS = ["a red circle", "a photo of a small red circle left"]


def build(model_type: str, mask_ratio: float, padding_first: bool = True):
    config = MaskedTextConfig(
        config={"model_type": model_type, **TINY},
        tokenizer="vlforge:shapes",
        embed_dim=8,
        mask_ratio=mask_ratio,
        padding_first=padding_first,
    )
    torch.manual_seed(0)
    return build_masked_text(config, BuildContext(recipe=SimpleNamespace(seed=0)))


def test_padding_goes_before_any_real_token():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [1] * 10])
    noise = torch.rand(2, 10, generator=torch.Generator().manual_seed(0))
    kept = text_keep_indices(noise, mask, keep=6, padding_first=True)
    assert kept[0, :5].tolist() == [0, 1, 2, 3, 4] and kept[0, 5] >= 5  # all words, one pad
    assert kept[1, 0] == 0 and kept[1].unique().numel() == 6  # first token always kept
    assert (mask.gather(1, text_keep_indices(noise, mask, keep=3, padding_first=True)) == 1).all()


def test_random_order_may_keep_padding_over_words():
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]]).repeat(200, 1)
    noise = torch.rand(200, 8, generator=torch.Generator().manual_seed(0))
    kept = text_keep_indices(noise, mask, keep=2, padding_first=False)
    assert (kept[:, 0] == 0).all()
    assert (mask.gather(1, kept)[:, 1] == 0).float().mean() > 0.7  # 6 of the 7 candidates are padding


@pytest.mark.parametrize("model_type", ["bert", "roberta-prelayernorm"])
def test_dropping_only_padding_changes_nothing(model_type):
    """Kept tokens keep their position ids: the short caption's features are exactly unchanged."""
    encoder = build(model_type, mask_ratio=0.5).train()  # K = floor(10 * 0.5) = 5 of 10
    batch = encoder.tokenize(CAPTIONS)
    assert batch["input_ids"].shape == (2, 10)
    masked = encoder(**batch)
    assert masked.tokens.shape == (2, 5, 32) and masked.attention_mask[0].all()
    full = encoder.eval()(**batch)
    assert full.tokens.shape == (2, 10, 32)
    torch.testing.assert_close(masked.embedding[0], full.embedding[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked.embedding[1], full.embedding[1], atol=1e-3)  # lost real words


def test_ratio_zero_is_hf_text_with_the_same_keys():
    encoder = build("bert", mask_ratio=0.0).train()
    torch.manual_seed(0)
    plain = build_hf_text(
        HFTextConfig(
            config={"model_type": "bert", **TINY},
            tokenizer="vlforge:shapes",
            embed_dim=8,
        )
    ).train()
    assert encoder.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(encoder.state_dict())
    batch = encoder.tokenize(CAPTIONS)
    assert torch.equal(encoder(**batch).embedding, plain(**batch).embedding)
