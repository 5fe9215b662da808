"""clip.infonce: loss values, logit scale and its clamp, hooks, local loss across ranks (methods.md §3.8)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import vlforge_plugins.clip as clip
from pydantic import ValidationError
from vlforge_plugins.clip import InfoNCEConfig, build_infonce
from vlforge_plugins.clip.loss import InfoNCE, local_infonce

from vlforge.components import BuildContext
from vlforge.plugins import Plugins

LN_100 = math.log(100)


def objective(**options) -> InfoNCE:
    parts = {"vision": SimpleNamespace(embed_dim=8), "text": SimpleNamespace(embed_dim=8)}
    return build_infonce(InfoNCEConfig(**options), BuildContext(recipe=None, parts=parts))


def features(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def reference_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The global CLIP loss written out independently: one N×N matrix, rows then columns."""
    logits = logit_scale.exp() * image @ text.T  # (N, N)
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# --------------------------------------------------------------------------- values


def test_identical_features_give_ln_n():
    image = text = F.normalize(torch.ones(6, 8), dim=-1)
    loss = objective().loss(image, text)
    torch.testing.assert_close(loss, torch.tensor(math.log(6)))


def test_matched_orthogonal_features_at_scale_100_give_zero():
    image = text = torch.eye(6, 8)
    loss = objective(init_temperature=0.01).loss(image, text)
    assert loss.item() < 1e-6


def test_single_process_loss_is_the_global_loss():
    image, text = features(5, seed=0), features(5, seed=1)
    infonce = objective()
    torch.testing.assert_close(infonce.loss(image, text), reference_loss(image, text, infonce.logit_scale))


def test_loss_is_symmetric_in_image_and_text():
    image, text = features(5, seed=0), features(5, seed=1)
    infonce = objective()
    torch.testing.assert_close(infonce.loss(image, text), infonce.loss(text, image), rtol=0, atol=0)


def test_objective_reads_the_step_embeddings():
    image, text = features(4, seed=0), features(4, seed=1)
    step = SimpleNamespace(image=SimpleNamespace(embedding=image), text=SimpleNamespace(embedding=text))
    infonce = objective()
    assert infonce(step).keys() == {"contrastive"}
    torch.testing.assert_close(infonce(step)["contrastive"], infonce.loss(image, text))


def test_logits_stay_fp32_under_autocast():
    image, text = features(4, seed=0), features(4, seed=1)
    infonce = objective()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = infonce.loss(image, text)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, infonce.loss(image, text), rtol=0, atol=0)


# --------------------------------------------------------------------------- logit scale


def test_logit_scale_starts_at_one_over_init_temperature():
    infonce = objective()
    assert infonce.logit_scale.shape == () and infonce.logit_scale.requires_grad
    assert abs(math.exp(infonce.logit_scale.item()) - 1 / 0.07) < 2e-6  # one fp32 ulp of s
    assert infonce.temperature == pytest.approx(0.07)
    assert not objective(learnable=False).logit_scale.requires_grad


def test_clamp_after_an_optimizer_step_that_overshoots():
    infonce = objective()
    optimizer = torch.optim.SGD(infonce.parameters(), lr=1.0)
    infonce.logit_scale.grad = torch.tensor(-10.0)
    optimizer.step()
    assert infonce.logit_scale.item() > LN_100
    infonce.clamp_()
    assert infonce.logit_scale.item() == pytest.approx(4.6052, abs=1e-4)
    infonce.logit_scale.data.fill_(-1.0)
    infonce.clamp_()
    assert infonce.logit_scale.item() == 0.0


def test_hooks_clamp_and_log_through_the_plugin_manager():
    plugins = Plugins()
    infonce = objective()
    plugins.register_component(infonce, "objectives.clip")
    assert plugins.manager.has_plugin("objectives.clip")
    infonce.logit_scale.data.fill_(7.0)
    plugins.call("vlforge_after_optimizer_step", state=None)
    assert infonce.logit_scale.item() == pytest.approx(LN_100)
    metrics: dict[str, float] = {}
    plugins.call("vlforge_log", state=None, metrics=metrics)
    assert metrics["clip/logit_scale"] == pytest.approx(100.0, rel=1e-6)


# --------------------------------------------------------------------------- registration and config


def test_registers_clip_infonce():
    plugins = Plugins()
    plugins.register(clip, "clip", source="vlforge_plugins.clip (test)")
    component = plugins.registry.get("objective", "clip.infonce")
    assert component.config is InfoNCEConfig and component.factory is build_infonce


def test_config_refuses_a_start_outside_the_clamp():
    with pytest.raises(ValidationError, match="outside the clamp range"):
        InfoNCEConfig(init_temperature=0.001)
    with pytest.raises(ValidationError, match="extra"):
        InfoNCEConfig(temperature=0.07)


def test_factory_needs_matching_projections():
    config = InfoNCEConfig()
    parts = {"vision": SimpleNamespace(embed_dim=8), "text": SimpleNamespace(embed_dim=0)}
    with pytest.raises(ValueError, match="embed_dim > 0"):
        build_infonce(config, BuildContext(recipe=None, parts=parts))
    parts["text"] = SimpleNamespace(embed_dim=4)
    with pytest.raises(ValueError, match="equal embed_dim"):
        build_infonce(config, BuildContext(recipe=None, parts=parts))


def test_factory_builds_on_meta_for_dry_runs():
    parts = {"vision": SimpleNamespace(embed_dim=8), "text": SimpleNamespace(embed_dim=8)}
    infonce = build_infonce(InfoNCEConfig(), BuildContext(recipe=None, meta=True, parts=parts))
    assert infonce.logit_scale.device.type == "meta"


# --------------------------------------------------------------------------- across ranks


def test_simulated_ranks_local_losses_average_to_the_global_loss():
    world, n = 4, 3
    image = features(world * n, seed=0).requires_grad_()
    text = features(world * n, seed=1).requires_grad_()
    logit_scale = torch.tensor(math.log(1 / 0.07))

    expected = reference_loss(image, text, logit_scale)
    expected_grads = torch.autograd.grad(expected, (image, text))

    # Each simulated rank sees all features through a differentiable "gather" (the full tensors).
    local = [
        local_infonce(image[r * n : (r + 1) * n], text[r * n : (r + 1) * n], image, text, logit_scale, r * n)
        for r in range(world)
    ]
    averaged = torch.stack(local).mean()
    grads = torch.autograd.grad(averaged, (image, text))

    torch.testing.assert_close(averaged, expected, rtol=0, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_two_gloo_ranks_match_one_process(tmp_path, monkeypatch):
    """DDP over 2 real processes, each with half the batch: gradients equal one process on the whole."""
    import torch.multiprocessing as mp

    # Spawned children import the worker by name, so its folder must be on their (inherited) path.
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    worker = importlib.import_module("clip_ddp_worker")
    mp.spawn(worker.run, args=(2, str(tmp_path)), nprocs=2, join=True)

    model = worker.Towers()
    images, texts = worker.batch()
    image, text = F.normalize(model.image(images), dim=-1), F.normalize(model.text(texts), dim=-1)
    loss = reference_loss(image, text, model.objective.logit_scale)
    loss.backward()
    expected = worker.gradients(model)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(
        torch.stack([r["loss"] for r in ranks]).mean(), loss.detach(), rtol=0, atol=1e-6
    )
    for result in ranks:
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
