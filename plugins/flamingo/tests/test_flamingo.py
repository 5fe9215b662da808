"""Flamingo's modules against methods.md §4.8: identity at init, media causality, masks, resampler
shapes, insertion counts, freezing, label masking, weighted loss, cached-media generation."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from vlforge_plugins.flamingo import GatedXAttnConfig, PerceiverConfig, build_gated_xattn, build_perceiver
from vlforge_plugins.flamingo.data import (
    IGNORE,
    document_text,
    interleaved_labels,
    pair_labels,
    tokenize_padded,
)
from vlforge_plugins.flamingo.generate import greedy_generate
from vlforge_plugins.flamingo.lm import (
    SYNC_FREE_SDPA,
    FlamingoLM,
    check_embedding_not_decayed,
    find_decoder_layers,
    load_causal_lm,
    load_tokenizer,
)
from vlforge_plugins.flamingo.metrics import cider_d
from vlforge_plugins.flamingo.objective import FlamingoObjective, lm_loss
from vlforge_plugins.flamingo.resampler import PerceiverResampler
from vlforge_plugins.flamingo.xattn import MaskedCrossAttention, media_allowed, text_time

from vlforge.components import BuildContext
from vlforge.encoders import TimmViTConfig, build_timm_vit
from vlforge.recipe import OptimSection

VISION = TimmViTConfig(model="vit_tiny_patch16_224", img_size=32, patch_size=8, width=32, depth=2, heads=2)
PERCEIVER = PerceiverConfig(depth=2, num_latents=8, heads=2, dim_head=16)
LM_CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 128},
    "opt": {
        "model_type": "opt",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "ffn_dim": 128,
        "word_embed_proj_dim": 64,
        "max_position_embeddings": 128,
    },
    "gpt_neox": {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
    },
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
    },
    "mpt": {"model_type": "mpt", "d_model": 64, "n_layers": 4, "n_heads": 4, "max_seq_len": 128},
}
# Two documents, the second with text before its first image and two images.
TEXTS = [
    "<image>a small red circle at the center<|endofchunk|>[SEP]",
    "here are some pictures<image>a large blue square at the top left<|endofchunk|>"
    "now something else<image>question : what color is the shape ? answer : green<|endofchunk|>[SEP]",
]


def build_parts(lm: str = "gpt2", **fusion_options) -> SimpleNamespace:
    """vision, adapter and fusion as a model-like namespace (what objectives and generation read)."""
    torch.manual_seed(0)
    ctx = BuildContext(recipe=None)
    ctx.parts["vision"] = build_timm_vit(VISION, ctx)
    ctx.parts["adapter"] = build_perceiver(PERCEIVER, ctx)
    options = {"lm_config": LM_CONFIGS[lm], "tokenizer": "flamingo:shapes", "heads": 2, "dim_head": 16}
    ctx.parts["fusion"] = build_gated_xattn(GatedXAttnConfig(**(options | fusion_options)), ctx)
    return SimpleNamespace(**ctx.parts)


def open_gates(fusion, attn: float = 0.5, dense: float = 0.5) -> None:
    with torch.no_grad():
        for block in fusion.xattn:
            block.attn_gate.fill_(attn)
            block.ff_gate.fill_(dense)


@pytest.fixture(scope="module")
def parts() -> SimpleNamespace:
    return build_parts()


@pytest.fixture
def batch(parts) -> dict[str, torch.Tensor]:
    from vlforge_plugins.flamingo.data import tokenize_padded

    tokens = tokenize_padded(parts.fusion.tokenizer, TEXTS, 128)
    images = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (B,T,3,H,W)
    return tokens | {"images": images}


def flamingo_logits(parts, batch) -> torch.Tensor:
    media = parts.adapter.encode_images(parts.vision, batch["images"])
    return parts.fusion(batch["input_ids"], batch["attention_mask"], media).logits


def positions_of(ids: torch.Tensor, token_id: int) -> list[int]:
    return (ids == token_id).nonzero().flatten().tolist()


# --------------------------------------------------------------------------- 1. identity at init


@pytest.mark.parametrize("family", sorted(LM_CONFIGS))
def test_gates_at_zero_give_the_frozen_lm_logits_bitwise(family):
    tokenizer = load_tokenizer("flamingo:shapes")
    config = GatedXAttnConfig(lm_config=LM_CONFIGS[family], tokenizer="flamingo:shapes")
    torch.manual_seed(0)
    lm = load_causal_lm(config, tokenizer, meta=False).eval()
    frozen = copy.deepcopy(lm)  # the LM before any block was inserted
    fusion = FlamingoLM(lm, tokenizer, media_dim=32, every=1, heads=2, dim_head=16).eval()
    tokens = tokenize_padded(tokenizer, TEXTS, 128)
    expected = frozen(**tokens).logits
    for seed in (0, 1):  # any media
        media = torch.randn(2, 2, 8, 32, generator=torch.Generator().manual_seed(seed)) * 10
        assert torch.equal(fusion(tokens["input_ids"], tokens["attention_mask"], media).logits, expected)


@pytest.mark.parametrize("family", sorted(LM_CONFIGS))
def test_the_always_masked_sdpa_lm_gives_stock_sdpa_logits_bitwise(family):
    """The LM runs SDPA under a name whose mask never asks ``mask.all()`` (a host sync per
    step); prefill with and without padding and a cached decode step equal stock SDPA."""
    tokenizer = load_tokenizer("flamingo:shapes")
    config = GatedXAttnConfig(lm_config=LM_CONFIGS[family], tokenizer="flamingo:shapes")
    torch.manual_seed(0)
    lm = load_causal_lm(config, tokenizer, meta=False).eval()
    if lm.config._attn_implementation == "eager":  # its mask is built without asking: left alone
        pytest.skip(f"{family} has no SDPA attention in transformers")
    assert lm.config._attn_implementation == SYNC_FREE_SDPA
    stock = copy.deepcopy(lm)
    stock.set_attn_implementation("sdpa")
    padded = tokenize_padded(tokenizer, TEXTS, 128)
    assert not padded["attention_mask"].all()  # one text is shorter: padding is exercised
    unpadded = {key: value[:1] for key, value in padded.items()}
    for tokens in (padded, unpadded):
        ours, theirs = lm(**tokens, use_cache=True), stock(**tokens, use_cache=True)
        assert torch.equal(ours.logits, theirs.logits)
        mask = tokens["attention_mask"]
        step = {
            "input_ids": tokens["input_ids"][:, -1:],
            "attention_mask": torch.cat([mask, mask[:, -1:]], 1),
        }
        assert torch.equal(
            lm(**step, past_key_values=ours.past_key_values).logits,
            stock(**step, past_key_values=theirs.past_key_values).logits,
        )


def test_gates_at_zero_give_the_frozen_lm_logits_under_bf16_autocast(batch):
    parts = build_parts("llama")
    parts.fusion.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = flamingo_logits(parts, batch)
        frozen = parts.fusion.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert logits.dtype == torch.bfloat16 and torch.equal(logits, frozen)
        open_gates(parts.fusion)
        assert torch.isfinite(flamingo_logits(parts, batch)).all()


def test_a_pretrained_folder_is_loaded_and_its_embedding_grown_for_the_new_tokens(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from vlforge_plugins.flamingo.data import shapes_tokenizer

    base = shapes_tokenizer()  # no Flamingo tokens yet
    torch.manual_seed(0)
    saved = GPT2LMHeadModel(GPT2Config(vocab_size=len(base), n_embd=64, n_layer=2, n_head=4)).eval()
    saved.save_pretrained(tmp_path)
    base.save_pretrained(tmp_path)
    ctx = BuildContext(recipe=None, parts={"adapter": SimpleNamespace(width=32)})
    fusion = build_gated_xattn(GatedXAttnConfig(lm=str(tmp_path), heads=2, dim_head=16), ctx).eval()
    rows = fusion.lm.get_input_embeddings().weight
    assert len(fusion.tokenizer) == len(base) + 2 == rows.shape[0]
    assert torch.equal(rows[: len(base)], saved.get_input_embeddings().weight)
    assert fusion.image_token_id >= len(base) and fusion.end_of_chunk_token_id >= len(base)
    ids = torch.tensor([[base.bos_token_id, 7, 8, 9]])
    media = torch.randn(1, 1, 8, 32)
    logits = fusion(ids, torch.ones_like(ids), media).logits[..., : len(base)]
    assert torch.equal(logits, saved(input_ids=ids).logits)
    on_meta = build_gated_xattn(
        GatedXAttnConfig(lm=str(tmp_path)), BuildContext(recipe=None, meta=True, parts=ctx.parts)
    )
    assert (
        on_meta.lm.device.type == "meta" and on_meta.lm.get_input_embeddings().num_embeddings == len(base) + 2
    )


def test_unknown_layout_names_the_supported_ones():
    with pytest.raises(
        ValueError, match=r"cannot find the decoder layers of Sequential.*LLaMA: model\.layers"
    ):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))


# --------------------------------------------------------------------------- 2. media causality


def test_open_xattn_gate_changes_only_text_after_an_image(batch):
    parts = build_parts()
    parts.fusion.eval()
    before = flamingo_logits(parts, batch)
    open_gates(parts.fusion, attn=0.5, dense=0.0)
    after = flamingo_logits(parts, batch)
    times = text_time(batch["input_ids"], parts.fusion.image_token_id)
    changed = (after != before).any(dim=-1)  # (B,L)
    real = batch["attention_mask"].bool()
    assert torch.equal(changed[real], (times >= 1)[real])
    first_image = positions_of(batch["input_ids"][1], parts.fusion.image_token_id)[0]
    assert first_image > 0 and torch.equal(after[1, :first_image], before[1, :first_image])


def test_perturbing_image_two_leaves_earlier_positions_unchanged(batch):
    parts = build_parts()
    parts.fusion.eval()
    open_gates(parts.fusion, attn=0.7, dense=0.3)
    reference = flamingo_logits(parts, batch)
    perturbed = dict(batch, images=batch["images"].clone())
    perturbed["images"][1, 1] = torch.randn(3, 32, 32)
    logits = flamingo_logits(parts, perturbed)
    second_image = positions_of(batch["input_ids"][1], parts.fusion.image_token_id)[1]
    assert torch.equal(logits[1, :second_image], reference[1, :second_image])
    assert not torch.equal(logits[1, second_image:], reference[1, second_image:])
    assert torch.equal(logits[0], reference[0])  # the other row never saw it


# --------------------------------------------------------------------------- 3. mask patterns


WORKED_IDS = torch.tensor([[10, 11, 1, 12, 13, 2, 1, 14, 15, 2]])  # t0 t1 <image> a b <eoc> <image> c d <eoc>


def test_text_time_of_the_worked_example():
    assert text_time(WORKED_IDS, image_token_id=1).tolist() == [[0, 0, 1, 1, 1, 1, 2, 2, 2, 2]]


@pytest.mark.parametrize(
    ("only_immediate", "second_image_row"),
    [(True, [0, 1]), (False, [1, 1])],
    ids=["immediate", "all_previous"],
)
def test_mask_matrix_of_the_worked_example(only_immediate, second_image_row):
    allowed = media_allowed(
        text_time(WORKED_IDS, 1), num_media=2, latents_per_medium=1, only_immediate=only_immediate
    )
    expected = [[0, 0]] * 2 + [[1, 0]] * 4 + [second_image_row] * 4
    assert allowed[0].int().tolist() == expected


@pytest.mark.parametrize("only_immediate", [True, False])
def test_cross_attention_is_exactly_zero_before_the_first_image(only_immediate):
    torch.manual_seed(0)
    attention = MaskedCrossAttention(64, 32, heads=2, dim_head=16, only_immediate=only_immediate)
    times = text_time(WORKED_IDS, 1)
    out = attention(torch.randn(1, 10, 64) * 5, torch.randn(1, 2, 4, 32) * 5, times)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :2], torch.zeros(2, 64)) and (out[0, 2:] != 0).any(dim=-1).all()


# --------------------------------------------------------------------------- 4. resampler


@pytest.mark.parametrize("tokens", [16, 100])
def test_resampler_gives_a_fixed_number_of_normalised_latents(tokens):
    torch.manual_seed(0)
    resampler = PerceiverResampler(32, depth=2, num_latents=8, heads=2, dim_head=16)
    out = resampler(torch.randn(3, 2, 1, tokens, 32))  # (B,T,F,v,d)
    assert out.shape == (3, 2, 8, 32)
    assert isinstance(resampler.norm, nn.LayerNorm)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 2, 8), atol=1e-5, rtol=0)  # final LN
    assert 0.9 < resampler.latents.std().item() < 1.1  # randn init


@pytest.mark.slow
def test_a_resampler_layer_compiles_with_inductor_and_matches_eager():
    """``train.compile`` compiles each Perceiver attention with inductor, whose CPU attention
    lowering once refused the (B,T,heads,L,h) layout (query n latents, keys M+n)."""
    torch.manual_seed(0)
    resampler = PerceiverResampler(32, depth=1, num_latents=8, heads=2, dim_head=16)
    attention = resampler.shard_units()[0]
    media, latents = torch.randn(4, 2, 16, 32), torch.randn(4, 2, 8, 32)
    eager = attention(media, latents)
    eager.sum().backward()
    expected = [p.grad.clone() for p in attention.parameters()]
    attention.zero_grad()
    compiled = torch.compile(attention)(media, latents)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    for grad, want in zip([p.grad for p in attention.parameters()], expected, strict=True):
        torch.testing.assert_close(grad, want)


def test_resampler_keeps_images_apart_and_adds_time_embeddings():
    torch.manual_seed(0)
    resampler = PerceiverResampler(
        32, depth=1, num_latents=4, heads=2, dim_head=16, max_media=3, max_frames=2
    )
    media = torch.randn(1, 2, 2, 5, 32)
    out = resampler(media)
    changed = media.clone()
    changed[0, 1] += 1.0
    assert out.shape == (1, 2, 4, 32)
    assert torch.equal(resampler(changed)[0, 0], out[0, 0])  # image 1's latents ignore image 2


# --------------------------------------------------------------------------- 5. insertion


@pytest.mark.parametrize(("every", "layers"), [(1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])])
def test_blocks_go_before_every_nth_decoder_layer(every, layers):
    fusion = build_parts(every=every).fusion
    assert fusion.xattn_layers == layers and len(fusion.xattn) == len(layers)
    hooked = [i for i, layer in enumerate(find_decoder_layers(fusion.lm)) if layer._forward_pre_hooks]
    assert hooked == layers
    units = fusion.shard_units()
    expected = ["GPT2Block"] * 4 + ["GatedCrossAttentionBlock"] * len(layers)
    assert [type(unit).__name__ for unit in units] == expected


# --------------------------------------------------------------------------- 6. freezing


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_only_resampler_blocks_and_embedding_train(parts):
    assert not trainable_names(parts.vision) and not parts.vision.training
    assert trainable_names(parts.adapter) == {n for n, _ in parts.adapter.named_parameters()}
    fusion = trainable_names(parts.fusion)
    assert fusion == {n for n, _ in parts.fusion.xattn.named_parameters(prefix="xattn")} | {
        "lm.transformer.wte.weight"
    }
    assert "lm.transformer.wte.weight" not in trainable_names(build_parts(train_embeddings=False).fusion)


def test_one_adamw_step_changes_no_frozen_weight_and_only_two_embedding_rows(batch):
    parts = build_parts()
    modules = nn.ModuleDict({"vision": parts.vision, "adapter": parts.adapter, "fusion": parts.fusion})
    before = {name: p.detach().clone() for name, p in modules.named_parameters()}
    embedding = "fusion.lm.transformer.wte.weight"
    trained = [p for n, p in modules.named_parameters() if p.requires_grad and n != embedding]
    optimizer = torch.optim.AdamW(
        [
            {"params": trained, "weight_decay": 0.1},
            {"params": [modules.get_parameter(embedding)], "weight_decay": 0},
        ],
        lr=1e-2,
    )
    labels = pair_labels(batch["input_ids"], batch["attention_mask"], parts.fusion.image_token_id)
    lm_loss(flamingo_logits(parts, batch), labels).backward()
    parts.fusion.mask_embedding_grad()
    optimizer.step()
    for name, param in modules.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, before[name]), name
    changed_rows = (modules.get_parameter(embedding) != before[embedding]).any(dim=1).nonzero().flatten()
    expected = sorted([parts.fusion.image_token_id, parts.fusion.end_of_chunk_token_id])
    assert changed_rows.tolist() == expected
    assert all(not torch.equal(p, before[n]) for n, p in modules.named_parameters() if "attn_gate" in n)


def test_weight_decay_on_the_trained_embedding_is_refused(parts):
    with pytest.raises(ValueError, match=r"add 'fusion\.lm\.transformer\.wte' to optim\.no_decay"):
        check_embedding_not_decayed(parts.fusion, OptimSection(weight_decay=0.1))
    check_embedding_not_decayed(parts.fusion, OptimSection(weight_decay=0.1, no_decay=["wte"]))
    check_embedding_not_decayed(parts.fusion, OptimSection(weight_decay=0.0))


def test_checkpointing_gives_the_same_gradients(batch):
    grads = []
    for checkpointing in (False, True):
        parts = build_parts(gradient_checkpointing=checkpointing)
        open_gates(parts.fusion)
        labels = pair_labels(batch["input_ids"], batch["attention_mask"], parts.fusion.image_token_id)
        lm_loss(flamingo_logits(parts, batch), labels).backward()
        grads.append({n: p.grad for n, p in parts.fusion.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# --------------------------------------------------------------------------- 7. labels


IMAGE, EOC, EOS, PAD = 1, 2, 3, 0


def test_pair_labels_drop_padding_and_the_image_token():
    ids = torch.tensor([[IMAGE, 20, 21, EOC, EOS, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert pair_labels(ids, mask, IMAGE).tolist() == [[IGNORE, 20, 21, EOC, EOS, IGNORE]]


def test_interleaved_labels_drop_text_tied_to_no_image():
    #                    intro   <image> cap     eoc  between <image> qa  eoc  eos  pad
    ids = torch.tensor([[30, 31, IMAGE, 20, 21, EOC, 32, 33, IMAGE, 22, EOC, EOS, PAD]])
    mask = torch.ones_like(ids).masked_fill(ids == PAD, 0)
    labels = interleaved_labels(ids, mask, IMAGE, EOC)
    assert labels.tolist() == [
        [IGNORE, IGNORE, IGNORE, 20, 21, EOC, IGNORE, IGNORE, IGNORE, 22, EOC, IGNORE, IGNORE]
    ]


def test_mmc4_documents_get_openflamingo_layout():
    # Images 1 and 2 come before sentence 1, image 3 before sentence 3.
    text = document_text(["intro", "first", "second", "end"], [1, 1, 3], eos="[SEP]")
    expected = "intro<image><|endofchunk|><image>first second<|endofchunk|><image>end<|endofchunk|>[SEP]"
    assert text == expected


def test_a_sequence_without_supervised_tokens_gives_zero_loss_not_nan():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    loss = lm_loss(logits, torch.full((2, 5), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_lm_loss_is_the_mean_next_token_nll():
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[IGNORE, 2, IGNORE, 5]])
    expected = -(logits[0, 0].log_softmax(-1)[2] + logits[0, 2].log_softmax(-1)[5]) / 2
    torch.testing.assert_close(lm_loss(logits, labels), expected)


# --------------------------------------------------------------------------- 8. dataset weights


def test_objective_terms_are_the_dataset_shares_of_the_summed_loss(batch):
    parts = build_parts()
    parts.fusion.eval()  # no dropout: the two forwards below must agree
    labels = pair_labels(batch["input_ids"], batch["attention_mask"], parts.fusion.image_token_id)
    step = type("Step", (), {"model": parts, "batch": batch | {"labels": labels, "dataset": "pairs"}})
    nll = lm_loss(flamingo_logits(parts, batch), labels)
    weighted = FlamingoObjective({"mmc4": 1.0, "pairs": 0.2})(step)
    assert weighted.keys() == {"pairs"}
    torch.testing.assert_close(weighted["pairs"], 0.2 * 2 * nll)  # λ·M: the engine averages M batches
    assert FlamingoObjective()(step).keys() == {"pairs"}
    with pytest.raises(KeyError, match="no weight"):
        FlamingoObjective({"mmc4": 1.0})(step)


# --------------------------------------------------------------------------- 9. cached media


def test_cached_tokens_without_image_see_the_last_cached_image():
    ids = torch.tensor([[40, 41, 42], [43, 44, 45]])
    assert text_time(ids, image_token_id=1, offset=torch.tensor([3, 1])).tolist() == [[3, 3, 3], [1, 1, 1]]


def test_cached_generation_equals_full_recomputation():
    parts = build_parts()
    parts.fusion.eval()
    open_gates(parts.fusion, attn=1.0, dense=1.0)
    fusion = parts.fusion
    prompts = tokenize_padded(
        fusion.tokenizer,
        ["<image>a small<|endofchunk|><image>question : what color", "<image>a large red"],
        128,
        side="left",
    )
    images = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    media = parts.adapter.encode_images(parts.vision, images)
    generated = greedy_generate(fusion, media, **prompts, max_new_tokens=6, stop_ids=[-1])
    # Reference: re-run the whole sequence for every new token, no cache.
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    for _ in range(6):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = fusion(ids, mask, media, position_ids=positions)
        logits = out.logits[:, -1]
        logits[:, fusion.image_token_id] = -torch.inf
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    assert generated == ids[:, -6:].tolist()
    assert out.text_time[:, -6:].tolist() == [[2] * 6, [1] * 6]  # each row's last image


# --------------------------------------------------------------------------- metrics


def test_cider_d_is_ten_for_perfect_distinct_captions_and_less_otherwise():
    references = [["a small red circle at the top left"], ["one large blue square in the middle"]]
    assert cider_d([r[0] for r in references], references) == pytest.approx(10.0)
    partial = cider_d(["a small red circle at the center", "one large blue square"], references)
    assert 0 < partial < 10
    assert cider_d(["nothing", "nothing"], references) == 0.0
