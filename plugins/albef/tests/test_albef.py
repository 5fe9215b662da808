"""albef: teacher, fusion, ITC/ITM/MLM and their start-up checks (methods.md §2.9, tiny CPU models)."""
# ruff: noqa: E501  (the tiny recipe keeps its one-line inline table)

from __future__ import annotations

import importlib
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from vlforge_plugins.albef.distill import alpha_at, soft_cross_entropy
from vlforge_plugins.albef.fusion import BertFusion
from vlforge_plugins.albef.itc import NEGATIVE_LOGITS, ImageTextContrastive, distillation_targets, itc_loss
from vlforge_plugins.albef.itm import matching_batch, sample_negatives
from vlforge_plugins.albef.mlm import IGNORE, mask_tokens, mlm_loss
from vlforge_plugins.albef.teacher import MomentumTeacher

from vlforge.components import BuildContext
from vlforge.encoders import HFTextConfig, TimmViTConfig
from vlforge.encoders.text import build_hf_text
from vlforge.encoders.vision import build_timm_vit, load_timm_weights
from vlforge.engine import parameter_groups
from vlforge.model import Progress, Step, build_component, build_model
from vlforge.plugins import Plugins
from vlforge.recipe import OptimSection, load_recipe

TINY = """
name = "albef_test"
experiment = "tests"

[model.vision]
type = "timm.vit"
model = "vit_tiny_patch16_224"
img_size = 32
patch_size = 8
width = 32
depth = 2
heads = 2
embed_dim = 16

[model.text]
type = "hf.text"
config = { model_type = "bert", hidden_size = 32, num_hidden_layers = 4, num_attention_heads = 2, intermediate_size = 64, max_position_embeddings = 32 }
tokenizer = "vlforge:shapes"
max_length = 16
embed_dim = 16
num_layers = 2

[model.fusion]
type = "albef.fusion"

[teacher]
type = "momentum"

[objectives.itc]
type = "albef.itc"
queue_size = 32

[objectives.itm]
type = "albef.itm"

[objectives.mlm]
type = "albef.mlm"

[data]
type = "synthetic.shapes"
train_size = 64
val_size = 16
test_size = 16

[train]
steps = 4
batch_size = 8
"""
BATCH, QUEUE, EMBED = 8, 32, 16


def build(tmp_path: Path, *overrides: str, text: str = TINY):
    """(model, batch of BATCH training pairs) for the tiny recipe, built as the engine builds it."""
    path = tmp_path / "albef_test.toml"
    path.write_text(text)
    recipe, plugins = load_recipe(path, overrides)
    torch.manual_seed(0)
    ctx = BuildContext(recipe)
    model = build_model(recipe, plugins, ctx)
    data = build_component(plugins, "dataset", recipe.data, ctx)
    train = data.dataset("train")
    return model, data.collate([train[i] for i in range(BATCH)])


@pytest.fixture
def tiny(tmp_path):
    return build(tmp_path)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --------------------------------------------------------------------------- teacher (§2.9 1, 2)


def test_ema_is_one_minus_m_to_the_k():
    online = nn.Linear(3, 2)
    nn.init.ones_(online.weight), nn.init.ones_(online.bias)
    teacher = MomentumTeacher({"part": online}, momentum=0.995)
    for param in teacher.parts.parameters():
        nn.init.zeros_(param)
    teacher.update()
    for param in teacher.parts.parameters():
        torch.testing.assert_close(param, torch.full_like(param, 1 - 0.995))
    for _ in range(9):
        teacher.update()
    for param in teacher.parts.parameters():
        torch.testing.assert_close(param, torch.full_like(param, 1 - 0.995**10))
    assert online.weight.eq(1).all(), "the online weights are never touched"


def test_teacher_is_a_bitwise_copy_without_gradients_or_optimizer_slots(tiny):
    model, _ = tiny
    teacher = model.teacher
    assert set(teacher.parts) == {"vision", "text", "fusion"}
    for name in teacher.parts:
        online, copy = getattr(model, name).state_dict(), teacher.parts[name].state_dict()
        assert online.keys() == copy.keys()
        for key in online:
            assert torch.equal(online[key], copy[key]), f"{name}.{key}"
            assert online[key].data_ptr() != copy[key].data_ptr(), f"{name}.{key} is shared, not copied"
    assert not any(p.requires_grad for p in teacher.parameters())
    in_groups = {id(p) for group in parameter_groups(model, OptimSection()) for p in group["params"]}
    assert in_groups.isdisjoint(id(p) for p in teacher.parameters())
    # Neither the ITM head nor the temperature has a momentum twin.
    copied = sum(p.numel() for p in teacher.parameters())
    assert copied == sum(
        p.numel() for n in ("vision", "text", "fusion") for p in getattr(model, n).parameters()
    )
    assert not any("head" in key or "temperature" in key for key in teacher.state_dict())


def test_teacher_updates_through_the_after_optimizer_step_event(tiny):
    model, _ = tiny
    plugins = Plugins()
    plugins.register_component(model.teacher, "component:teacher")
    with torch.no_grad():
        model.vision.proj.weight.add_(1.0)
    before = model.teacher.parts["vision"].proj.weight.clone()
    plugins.call("vlforge_after_optimizer_step", state=None)
    expected = 0.995 * before + 0.005 * model.vision.proj.weight
    torch.testing.assert_close(model.teacher.parts["vision"].proj.weight, expected)


def test_teacher_and_queues_are_in_the_checkpointed_state_dict(tiny):
    model, _ = tiny
    keys = model.state_dict().keys()
    assert "teacher.parts.vision.proj.weight" in keys and "teacher.parts.fusion.mlm_bias" in keys
    assert {"objectives.itc.image_queue", "objectives.itc.text_queue", "objectives.itc.queue_ptr"} <= keys


def test_momentum_features_are_computed_once_per_micro_batch(tiny):
    model, batch = tiny
    step = Step(model, batch, Progress())
    first = model.teacher.image(step)
    assert model.teacher.image(step) is first and not first.tokens.requires_grad
    assert model.teacher.image(Step(model, batch, Progress())) is not first


# --------------------------------------------------------------------------- queues (§2.9 3)


def itc_module(queue: int = QUEUE, image_ids: str | None = None) -> ImageTextContrastive:
    return ImageTextContrastive(EMBED, queue, 0.07, (0.001, 0.5), 0.4, 1.0, image_ids)


def test_queues_start_unit_norm_and_wrap_after_q_over_g_enqueues():
    itc = itc_module()
    torch.testing.assert_close(itc.image_queue.norm(dim=1), torch.ones(QUEUE))
    torch.testing.assert_close(itc.text_queue.norm(dim=1), torch.ones(QUEUE))
    rows = BATCH
    for call in range(QUEUE // rows):
        assert int(itc.queue_ptr) == call * rows
        image, text = unit(rows, EMBED, seed=call), unit(rows, EMBED, seed=100 + call)
        itc.enqueue(image, text)  # world size 1, torch.distributed never initialised
        assert torch.equal(itc.image_queue[call * rows : (call + 1) * rows], image)
        assert torch.equal(itc.text_queue[call * rows : (call + 1) * rows], text)
    assert int(itc.queue_ptr) == 0


def test_enqueue_of_rows_that_do_not_divide_the_queue_is_refused():
    with pytest.raises(ValueError, match="not a multiple of the 5 features"):
        itc_module().enqueue(unit(5, EMBED), unit(5, EMBED))


def test_queue_size_must_divide_by_the_rows_per_micro_batch_at_build(tmp_path):
    with pytest.raises(
        ValueError, match=r"queue_size = 30 must be a multiple .* = 8 .*e\.g\. queue_size = 24"
    ):
        build(tmp_path, "objectives.itc.queue_size=30")
    # With accumulation each micro-batch enqueues batch_size / accum_steps rows.
    build(tmp_path, "objectives.itc.queue_size=36", "train.batch_size=36", "train.accum_steps=9")


# --------------------------------------------------------------------------- ITC (§2.9 4, 5, 6)


def itc_inputs(batch: int = 4, queue: int = 6):
    image, text = unit(batch, EMBED, seed=1), unit(batch, EMBED, seed=2)
    image_keys, text_keys = unit(batch + queue, EMBED, seed=3), unit(batch + queue, EMBED, seed=4)
    positives = F.pad(torch.eye(batch, dtype=torch.bool), (0, queue))
    return image, text, image_keys, text_keys, torch.tensor(0.07), positives


def test_itc_at_alpha_0_is_cross_entropy_on_the_diagonal_over_batch_plus_queue():
    image, text, image_keys, text_keys, tau, positives = itc_inputs()
    loss, sim_i2t, sim_t2i = itc_loss(image, text, image_keys, text_keys, tau, 0.0, positives)
    assert sim_i2t.shape == sim_t2i.shape == (4, 10)
    labels = torch.arange(4)
    expected = (
        F.cross_entropy(image @ text_keys.T / 0.07, labels)
        + F.cross_entropy(text @ image_keys.T / 0.07, labels)
    ) / 2
    torch.testing.assert_close(loss, expected)


def test_itc_at_alpha_1_is_cross_entropy_against_the_momentum_softmax():
    image, text, image_keys, text_keys, tau, positives = itc_inputs()
    loss, *_ = itc_loss(image, text, image_keys, text_keys, tau, 1.0, positives)
    i2t_targets = (image_keys[:4] @ text_keys.T / 0.07).softmax(dim=1)
    t2i_targets = (text_keys[:4] @ image_keys.T / 0.07).softmax(dim=1)
    expected = (
        -(i2t_targets * (image @ text_keys.T / 0.07).log_softmax(dim=1)).sum(1).mean()
        - (t2i_targets * (text @ image_keys.T / 0.07).log_softmax(dim=1)).sum(1).mean()
    ) / 2
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_distillation_target_rows_sum_to_one(alpha):
    hard = F.pad(torch.eye(3), (0, 5))
    targets = distillation_targets(hard, torch.randn(3, 8), alpha)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(3))
    if alpha == 0:
        assert torch.equal(targets, hard)


def test_itc_logits_stay_fp32_under_autocast():
    inputs = itc_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, sim_i2t, _ = itc_loss(*inputs[:5], 0.4, inputs[5])
    assert loss.dtype == sim_i2t.dtype == torch.float32
    torch.testing.assert_close(loss, itc_loss(*inputs[:5], 0.4, inputs[5])[0], rtol=0, atol=0)


def test_image_ids_make_every_key_of_the_same_image_a_positive():
    itc = itc_module(queue=4, image_ids="image_ids")
    itc.enqueue(unit(4, EMBED), unit(4, EMBED), torch.tensor([7, 9, 9, 3]))
    positives = itc.positives(3, torch.tensor([9, 5, 9]), torch.device("cpu"))  # (3, 3 + 4)
    expected = torch.tensor(
        [[1, 0, 1, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 1, 0]], dtype=torch.bool
    )
    assert torch.equal(positives, expected)


def test_alpha_ramps_over_the_first_epoch_then_stays():
    def alpha(step: int, epoch: int = 0) -> float:
        return alpha_at(Progress(step=step, epoch=epoch, steps_per_epoch=100), 0.4, 1.0)

    assert alpha(0) == 0.0
    assert alpha(25) == pytest.approx(0.1)
    assert alpha(99) == pytest.approx(0.396)
    assert alpha(100, epoch=1) == alpha(350, epoch=3) == pytest.approx(0.4)
    assert alpha_at(Progress(step=100, steps_per_epoch=100), 0.4, 2.0) == pytest.approx(0.2)  # LAVIS
    assert alpha_at(Progress(step=0), 0.4, 0.0) == 0.4


@pytest.mark.parametrize(("start", "clamped"), [(1.0, 0.5), (1e-6, 0.001), (0.05, 0.05)])
def test_temperature_is_clamped_in_the_forward(tiny, start, clamped):
    model, batch = tiny
    itc = model.objectives["itc"]
    itc.temperature.data.fill_(start)
    itc(Step(model, batch, Progress()))
    assert itc.temperature.item() == pytest.approx(clamped)


def test_itc_forward_enqueues_and_leaves_negative_logits_for_itm(tiny):
    model, batch = tiny
    itc, step = model.objectives["itc"], Step(model, batch, Progress(step=10, steps_per_epoch=8))
    loss = itc(step)["itc"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert int(itc.queue_ptr) == BATCH
    assert torch.equal(itc.image_queue[:BATCH], model.teacher.image(step).embedding)
    i2t, t2i = step.cache[NEGATIVE_LOGITS]
    assert i2t.shape == t2i.shape == (BATCH, BATCH)
    assert torch.isneginf(i2t.diagonal()).all() and torch.isfinite(i2t.fill_diagonal_(0)).all()
    model.eval()
    itc(Step(model, batch, Progress()))
    assert int(itc.queue_ptr) == BATCH, "evaluation never enqueues"


# --------------------------------------------------------------------------- ITM (§2.9 7)


def test_hard_negatives_are_never_the_positive():
    logits = torch.randn(6, 6) * 5
    logits[2] = 0.0  # a flat row
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_negatives(logits, generator) for _ in range(1000)])  # (1000, 6)
    assert not (draws == torch.arange(6)).any()
    assert set(draws[:, 2].tolist()) == {0, 1, 3, 4, 5}


def test_rows_without_a_candidate_draw_uniformly_from_the_others():
    logits = torch.full((3, 3), float("-inf"))  # every item shows the same image
    logits[1, 2] = float("nan")  # a NaN under AMP counts as no candidate, not as an error
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_negatives(logits, generator) for _ in range(3000)])
    assert not (draws == torch.arange(3)).any()
    for row in range(3):
        counts = torch.bincount(draws[:, row], minlength=3).float() / 3000
        others = [j for j in range(3) if j != row]
        assert counts[others].sub(0.5).abs().max() < 0.05


def test_forbidden_items_are_never_drawn():
    logits = torch.zeros(4, 4)
    logits[:, 1] = float("-inf")  # item 1 shows the same image as everyone's positive
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_negatives(logits, generator) for _ in range(500)])
    assert not (draws[:, [0, 2, 3]] == 1).any()


def test_a_batch_of_one_has_no_negative():
    with pytest.raises(ValueError, match="micro-batch of 1"):
        sample_negatives(torch.zeros(1, 1))


def test_matching_pairs_and_labels():
    texts, masks = torch.arange(3)[:, None, None].float().expand(3, 2, 1), torch.ones(3, 2)
    images = 10 + torch.arange(3)[:, None, None].float().expand(3, 4, 1)
    negative_images, negative_texts = torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])
    t, m, i, labels = matching_batch(texts, masks, images, negative_images, negative_texts)
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert t[:, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 2, 0, 1]
    assert i[:, 0, 0].tolist() == [10, 11, 12, 11, 12, 10, 10, 11, 12]
    assert m.shape == (9, 2)


def test_itm_scores_3b_pairs_and_logs_its_accuracy(tiny):
    model, batch = tiny
    step = Step(model, batch, Progress())
    model.objectives["itc"](step)
    itm = model.objectives["itm"]
    loss = itm(step)["itm"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert int(itm.seen) == 3 * BATCH
    scores = itm.score(model.fusion, step.text.tokens, step.text.attention_mask, step.image.tokens)
    assert scores.shape == (BATCH, 2) and scores.dtype == torch.float32
    metrics: dict[str, float] = {}
    itm.vlforge_log(state=None, metrics=metrics)
    assert 0.0 <= metrics["albef/itm_accuracy"] <= 1.0 and int(itm.seen) == 0


def test_itm_without_itc_first_and_one_pair_per_rank_are_refused(tmp_path):
    swapped = TINY.replace('[objectives.itc]\ntype = "albef.itc"\nqueue_size = 32\n\n', "") + (
        '\n[objectives.itc]\ntype = "albef.itc"\nqueue_size = 32\n'
    )
    with pytest.raises(ValueError, match="list an albef.itc objective before it"):
        build(tmp_path, text=swapped)
    with pytest.raises(ValueError, match="at least 2 pairs per rank"):
        build(tmp_path, "train.batch_size=4", "train.accum_steps=4", "objectives.itc.queue_size=4")


# --------------------------------------------------------------------------- MLM (§2.9 8, 9)

PAD, CLS, MASK, VOCAB = 0, 2, 4, 50


def test_mask_statistics_and_special_tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (200, 200), generator=generator)
    ids[:, 0] = CLS
    ids[:, 150:] = PAD
    masked, labels = mask_tokens(
        ids, vocab_size=VOCAB, mask_id=MASK, never_mask=(PAD, CLS), generator=generator
    )
    picked = labels != IGNORE
    eligible = (ids != PAD) & (ids != CLS)
    assert not picked[~eligible].any()  # never [PAD] or [CLS]
    assert torch.equal(labels[picked], ids[picked]) and (labels[~picked] == IGNORE).all()
    assert torch.equal(masked[~picked], ids[~picked])
    assert picked[eligible].float().mean().item() == pytest.approx(0.15, abs=0.01)
    n = picked.sum().item()
    became_mask = (masked[picked] == MASK).sum().item() / n
    unchanged = (masked[picked] == ids[picked]).sum().item() / n
    assert became_mask == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.02)  # kept, or drawn as itself
    assert 1 - became_mask - unchanged == pytest.approx(0.1, abs=0.02)


def test_mlm_distillation_identities():
    logits, labels = torch.randn(7, VOCAB, requires_grad=True), torch.randint(VOCAB, (7,))
    hard = F.cross_entropy(logits, labels)
    one_hot = F.one_hot(labels, VOCAB).float()
    torch.testing.assert_close(mlm_loss(logits, labels, one_hot, 0.4), hard)
    torch.testing.assert_close(mlm_loss(logits, labels, one_hot, 1.0), hard)
    torch.testing.assert_close(mlm_loss(logits, labels, torch.rand(7, VOCAB).softmax(1), 0.0), hard)
    soft = torch.rand(7, VOCAB).softmax(1)
    expected = 0.6 * hard + 0.4 * soft_cross_entropy(logits, soft).mean()
    torch.testing.assert_close(mlm_loss(logits, labels, soft, 0.4), expected)


def test_mlm_with_nothing_masked_is_zero_and_still_backpropagates():
    weight = torch.randn(VOCAB, 8, requires_grad=True)
    logits = torch.zeros(0, 8) @ weight.T  # (0, V)
    loss = mlm_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, VOCAB), 0.4)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(weight.grad, torch.zeros_like(weight))


def test_mlm_objective_runs_the_teacher_only_when_alpha_is_positive(tiny):
    model, batch = tiny
    mlm = model.objectives["mlm"]
    at_start = Step(model, batch, Progress(step=0, steps_per_epoch=10))
    assert torch.isfinite(mlm(at_start)["mlm"]) and "teacher.image" not in at_start.cache
    later = Step(model, batch, Progress(step=20, steps_per_epoch=10))
    assert torch.isfinite(mlm(later)["mlm"]) and "teacher.image" in later.cache


# --------------------------------------------------------------------------- fusion and shapes (§2.9 10)


def tiny_bert(layers: int):
    config = {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    return build_hf_text(HFTextConfig(config=config, tokenizer="vlforge:shapes", num_layers=layers))


def test_text_num_layers_hands_the_rest_over():
    text = tiny_bert(layers=3)
    assert len(text.model.encoder.layer) == 3 and len(text.removed_layers) == 1
    assert text.model.config.num_hidden_layers == 3
    assert not any(k.startswith("model.encoder.layer.3") for k in text.state_dict())
    with pytest.raises(ValueError, match="num_layers = 5 but the model has 4 layers"):
        tiny_bert(layers=5)


def test_fusion_without_cross_attention_is_the_rest_of_the_bert():
    """Text layers [0,2) + fusion layers [2,4) with the cross-attention's output zeroed = the 4-layer BERT."""
    torch.manual_seed(0)
    full = build_hf_text(
        HFTextConfig(
            config={
                "model_type": "bert",
                "hidden_size": 32,
                "num_hidden_layers": 4,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            },
            tokenizer="vlforge:shapes",
        )
    )
    torch.manual_seed(0)
    text = tiny_bert(layers=2)
    fusion = BertFusion(text.removed_layers, 24, text.model.config).eval()
    text.eval(), full.eval()
    for layer in fusion.layers:
        nn.init.zeros_(layer.cross_attention.dense.weight), nn.init.zeros_(layer.cross_attention.dense.bias)
    tokens = text.tokenize(["a red circle", "a big blue square on the left"])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    image = torch.randn(2, 5, 24)
    with torch.no_grad():
        fused = fusion(text(ids, mask).tokens, mask, image)
        expected = full(ids, mask).tokens
    real = mask.bool()
    torch.testing.assert_close(fused[real], expected[real], rtol=1e-4, atol=1e-4)


def test_fusion_attends_to_the_image_and_to_later_tokens():
    fusion = BertFusion(tiny_bert(layers=2).removed_layers, 24, tiny_bert(layers=2).model.config).eval()
    text, mask, image = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.long), torch.randn(2, 5, 24)
    with torch.no_grad():
        base = fusion(text, mask, image)[:, 0]
        other_image = fusion(text, mask, image + 1)[:, 0]
        changed_last = text.clone()
        changed_last[:, -1] += 1
        other_text = fusion(changed_last, mask, image)[:, 0]
    assert not torch.allclose(base, other_image)
    assert not torch.allclose(base, other_text), "self-attention must be bidirectional, not causal"


def test_mlm_logits_are_fp32_under_autocast():
    text = tiny_bert(layers=2)
    fusion = BertFusion(text.removed_layers, 24, text.model.config)
    embeddings = text.model.get_input_embeddings().weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fusion.mlm_logits(torch.randn(5, 32), embeddings)
    assert logits.shape == (5, embeddings.shape[0]) and logits.dtype == torch.float32


def test_mlm_head_loads_from_a_pretrained_bert_folder(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    bert = BertForMaskedLM(config)
    nn.init.normal_(bert.cls.predictions.bias)
    bert.save_pretrained(tmp_path)
    fusion = BertFusion([], 8, config)
    assert fusion.load_mlm_head(str(tmp_path))
    assert torch.equal(fusion.mlm_bias, bert.cls.predictions.bias)
    assert torch.equal(fusion.mlm_transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert not BertFusion([], 8, config).load_mlm_head(str(tmp_path / "missing"))


def test_vit_b16_at_256_gives_257_tokens_of_768():
    vit = build_timm_vit(TimmViTConfig(model="deit_base_patch16_224", img_size=256, embed_dim=256), meta=True)
    out = vit(torch.empty(2, 3, 256, 256, device="meta"))
    assert out.tokens.shape == (2, 257, 768) and out.embedding.shape == (2, 256)


def test_pos_embed_resampled_from_14x14_to_16x16_keeps_the_cls_row(tmp_path):
    from safetensors.torch import save_file

    small = {"model": "vit_tiny_patch16_224", "width": 32, "depth": 1, "heads": 2}
    source = build_timm_vit(TimmViTConfig(**small)).vit
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    target = build_timm_vit(TimmViTConfig(**small, img_size=256)).vit
    load_timm_weights(target, str(tmp_path / "vit.safetensors"))
    assert source.pos_embed.shape == (1, 197, 32) and target.pos_embed.shape == (1, 257, 32)
    assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])


def test_parts_that_albef_needs_are_named_when_missing(tmp_path):
    with pytest.raises(ValueError, match="num_layers below the model's layer count"):
        build(tmp_path, "model.text.num_layers=4")  # no layer left for the fusion
    with pytest.raises(ValueError, match=r"albef.itc needs \[teacher\].*copies \['text'\]"):
        build(tmp_path, 'teacher.parts=["text"]', "objectives.mlm.alpha=0.0")
    build(
        tmp_path, 'teacher.parts=["vision", "text"]', "objectives.mlm.alpha=0.0"
    )  # no MLM distillation: fine
    with pytest.raises(ValueError, match="albef.mlm with alpha > 0 needs"):
        build(tmp_path, 'teacher.parts=["vision", "text"]')


# --------------------------------------------------------------------------- across ranks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_hold_identical_queues_after_enqueue(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    worker = importlib.import_module("albef_ddp_worker")
    mp.spawn(worker.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # Three enqueues of 2 ranks × 2 rows into 8 slots: the last one wrapped onto slots 0..3.
    rows = worker.BATCH * 2
    expected = {}
    for call in range(worker.ENQUEUES):
        gathered = [worker.features(rank, call) for rank in range(2)]  # rank order
        expected[(call * rows) % worker.QUEUE] = [torch.cat(parts) for parts in zip(*gathered)]
    for start, (image, text, ids) in expected.items():
        assert torch.equal(ranks[0]["image_queue"][start : start + rows], image)
        assert torch.equal(ranks[0]["text_queue"][start : start + rows], text)
        assert torch.equal(ranks[0]["id_queue"][start : start + rows], ids)
    assert int(ranks[0]["queue_ptr"]) == (worker.ENQUEUES * rows) % worker.QUEUE
    assert math.isclose(float(ranks[0]["image_queue"].norm(dim=1).mean()), 1.0, rel_tol=1e-5)
