"""Against the peers: vlforge's FLIP and Flamingo training steps vs open_clip's and open_flamingo's.

Two pairs, each on the same model sizes, the same fixed batch and the same masking ratio, timed in
one process in interleaved rounds (vlforge, peer, vlforge, peer, ...) so that the load of this
shared machine hits both sides alike; each figure is the median steps/s over the rounds.

* **FLIP vs open_clip** (``patch_dropout``): ViT-B/16 image tower (12 layers, width 768, patch 16)
  and a 12-layer width-512 text tower, 512-d embeddings, random init, mask ratio 0.5, InfoNCE,
  AdamW. vlforge's side is ``Trainer.train_step`` itself (recipes/flip_tiny.toml with the sizes
  overridden) fed one fixed batch; open_clip's side is ``open_clip.CLIP`` built from a config with
  ``patch_dropout=0.5``, ``ClipLoss`` and AdamW with open_clip_train's parameter groups.
* **Flamingo vs open_flamingo**: the same frozen timm ViT and frozen random GPT-2 LM, a Perceiver
  Resampler and a gated cross-attention block before every LM layer. vlforge's side is
  ``Trainer.train_step`` (recipes/flamingo_tiny.toml with sizes overridden, one dataset) on one
  fixed interleaved batch; open_flamingo's side is ``open_flamingo.src.flamingo.Flamingo`` around
  a GPT-2 of the same config and a timm ViT of the same config (no hub downloads), trained as
  open_flamingo's ``train_one_epoch`` does (HF loss on the labels, AdamW).

    python bench/peers.py            # ViT-B/16 at 112 px, batch 8; Flamingo LM 512 x 8, batch 8
    python bench/peers.py --smoke    # seconds: smaller sizes, 1 round of 1 step

The peers are benchmark-only, never runtime dependencies: open_clip_torch, einops and einops-exts
are pinned in requirements/ci.txt; open-flamingo pins an old transformers, so install it with
``pip install --no-deps open-flamingo==2.0.1`` (it runs on today's transformers through a
one-method compatibility subclass, ``positional_flamingo_layer``).
Prints a table and writes bench/results/peers.json (machine, torch, sizes, load average).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from record import RESULTS, record  # bench/ is on sys.path when run as a script
from torch import nn
from vlforge_plugins.flamingo.data import interleaved_labels

from vlforge.engine import Trainer, to_device
from vlforge.recipe import load_recipe

RECIPES = RESULTS.parents[1] / "recipes"
MASK_RATIO = 0.5
SIZES = {
    "full": {
        "flip": {"image": 112, "batch": 8, "text_length": 32, "steps": 1},
        "flamingo": {
            "width": 512,
            "layers": 8,
            "heads": 8,
            "vision": 192,
            "batch": 8,
            "length": 256,
            "steps": 3,
        },
    },
    "smoke": {
        "flip": {"image": 64, "batch": 4, "text_length": 16, "steps": 1},
        "flamingo": {
            "width": 128,
            "layers": 2,
            "heads": 4,
            "vision": 64,
            "batch": 2,
            "length": 64,
            "steps": 1,
        },
    },
}
FLAMINGO_VISION = {"model": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "depth": 4, "heads": 4}
FLAMINGO_IMAGES = 4  # images per interleaved sequence (its length // this = one chunk per image)
PERCEIVER = {"depth": 2, "num_latents": 16}  # heads 8, dim_head 64, ff_mult 4: both sides' defaults


class FixedStream:
    """The trainer's data stream, replaced by one batch served forever: both sides time compute only."""

    epoch = 0

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def next(self) -> dict[str, Any]:
        return self.batch


def vlforge_trainer(recipe_name: str, overrides: list[str], root: str) -> Trainer:
    common = ["train.progress=false", "train.eval_every=0", "train.checkpoint_every=0", "evaluators={}"]
    recipe, plugins = load_recipe(RECIPES / recipe_name, common + overrides)
    trainer = Trainer(recipe, plugins, tempfile.mkdtemp(dir=root))
    trainer.model.train()
    trainer.stream = FixedStream(trainer.stream.next())
    return trainer


# ---------------------------------------------------------------------------- FLIP vs open_clip


def flip_pair(size: dict, root: str) -> tuple[Callable[[], None], Callable[[], None], dict]:
    import open_clip
    from open_clip.loss import ClipLoss

    image, batch, length = size["image"], size["batch"], size["text_length"]
    text = {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "intermediate_size": 2048}
    overrides = [
        "model.vision.model=vit_base_patch16_224",
        f"model.vision.img_size={image}",
        "model.vision.patch_size=16",
        "model.vision.width=768",
        "model.vision.depth=12",
        "model.vision.heads=12",
        "model.vision.embed_dim=512",
        f"model.text.max_length={length}",
        "model.text.embed_dim=512",
        f"model.text.config.max_position_embeddings={length + 2}",  # + RoBERTa's position offset
        *(f"model.text.config.{key}={value}" for key, value in text.items()),
        f"masking.ratio={MASK_RATIO}",
        "masking.unmasked_from_step=1000000",  # masked every timed step (no unmasked tuning)
        f"train.batch_size={batch}",
        "train.steps=1000000",
        "train.log_every=1000000",
        f"data.image_size={image}",
    ]
    trainer = vlforge_trainer("flip_tiny.toml", overrides, root)
    hf_text = next(m for m in trainer.model.text.modules() if hasattr(m, "get_input_embeddings"))
    vocab = hf_text.get_input_embeddings().num_embeddings
    ids = trainer.stream.batch["input_ids"]
    length = ids.shape[1]  # the tokenizer pads to the batch's longest caption: open_clip gets that context

    torch.manual_seed(0)
    vision_cfg = open_clip.CLIPVisionCfg(
        layers=12, width=768, patch_size=16, image_size=image, patch_dropout=MASK_RATIO
    )
    text_cfg = open_clip.CLIPTextCfg(context_length=length, vocab_size=vocab, width=512, heads=8, layers=12)
    device = trainer.device
    model = (
        open_clip.CLIP(embed_dim=512, vision_cfg=vision_cfg, text_cfg=text_cfg, output_dict=True)
        .to(device)
        .train()
    )
    # open_clip_train/main.py: no weight decay on gains, biases and the logit scale.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
        ],
        lr=1e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = ClipLoss()
    images = (
        trainer.stream.batch["image"] if "image" in trainer.stream.batch else trainer.stream.batch["images"]
    )
    images = images.to(device)
    texts = ids.to(device)

    def open_clip_step() -> None:  # open_clip_train/train.py, accum_freq 1
        with trainer.autocast():
            out = model(images, texts)
            loss = loss_fn(**out)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)

    sizes = {
        "vision": f"ViT-B/16 (12 x 768, patch 16) at {image} px, {(image // 16) ** 2} patches",
        "text": f"12 x 512, 8 heads, context {length}, vocab {vocab}",
        "embed_dim": 512,
        "batch": batch,
        "mask_ratio": MASK_RATIO,
        "vlforge_params": sum(p.numel() for p in trainer.model.parameters()),
        "peer_params": sum(p.numel() for p in model.parameters()),
    }
    return trainer.train_step, open_clip_step, sizes


# ---------------------------------------------------------------------------- Flamingo vs open_flamingo


class TokenFeatures(nn.Module):
    """What open_flamingo reads from ``vision_encoder.visual(x)[1]``: a timm ViT's patch tokens."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.vit.forward_features(images)  # (B, 1 + N, D)


def positional_flamingo_layer():
    """open_flamingo 2.0.1's ``FlamingoLayer`` with today's transformers calling convention.

    transformers >= 4.5x calls GPT-2 blocks as ``block(hidden, past, mask, ...)`` (positional);
    FlamingoLayer.forward takes only ``(lang_x, attention_mask)`` positionally. This passes the
    positional arguments through to the decoder layer; the gated block runs as in the original.
    """
    from open_flamingo.src.flamingo_lm import FlamingoLayer

    class PositionalFlamingoLayer(FlamingoLayer):
        def forward(self, lang_x, *args, **kwargs):
            if self.gated_cross_attn_layer is not None:
                lang_x = self.gated_cross_attn_layer(
                    lang_x,
                    self.vis_x,
                    media_locations=self.media_locations,
                    use_cached_media=self.use_cached_media,
                )
            return self.decoder_layer(lang_x, *args, **kwargs)

    return PositionalFlamingoLayer


def flamingo_pair(size: dict, root: str) -> tuple[Callable[[], None], Callable[[], None], dict]:
    import timm
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.helpers import PerceiverResampler
    from open_flamingo.src.utils import extend_instance
    from transformers import AutoModelForCausalLM, GPT2Config

    width, layers, heads, vision, batch, length = (
        size[k] for k in ("width", "layers", "heads", "vision", "batch", "length")
    )
    lm = {"n_embd": width, "n_layer": layers, "n_head": heads, "n_positions": length}
    overrides = [
        *(f"model.vision.{key}={value}" for key, value in FLAMINGO_VISION.items()),
        f"model.vision.width={vision}",
        *(f"model.adapter.{key}={value}" for key, value in PERCEIVER.items()),
        "model.adapter.heads=8",
        "model.adapter.dim_head=64",
        *(f"model.fusion.lm_config.{key}={value}" for key, value in lm.items()),
        "model.fusion.heads=8",
        "model.fusion.dim_head=64",
        "model.fusion.every=1",
        "train.accum_steps=1",
        f"train.batch_size={batch}",
        "train.steps=1000000",
        "train.log_every=1000000",
        "data.sources={}",
        "data.sources.interleaved.type=flamingo.shapes",
        "data.sources.interleaved.kind=interleaved",
        f"data.sources.interleaved.max_images={FLAMINGO_IMAGES}",
        f"data.sources.interleaved.max_length={length}",
        "objectives.lm.dataset_weights={interleaved = 1.0}",
    ]
    trainer = vlforge_trainer("flamingo_tiny.toml", overrides, root)
    fusion, device = trainer.model.fusion, trainer.device
    served = fixed_interleaved_batch(trainer.stream.batch, fusion, batch, length)
    trainer.stream = FixedStream(served)

    torch.manual_seed(0)
    vit = timm.create_model(
        FLAMINGO_VISION["model"],
        img_size=FLAMINGO_VISION["img_size"],
        patch_size=FLAMINGO_VISION["patch_size"],
        embed_dim=vision,
        depth=FLAMINGO_VISION["depth"],
        num_heads=FLAMINGO_VISION["heads"],
        num_classes=0,
    )
    config = GPT2Config(
        vocab_size=fusion.lm.config.vocab_size, **lm, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    lang = AutoModelForCausalLM.from_config(config)
    extend_instance(lang, FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("transformer.h")
    holder = nn.Module()
    holder.visual = TokenFeatures(vit)
    model = Flamingo(
        holder,
        lang,
        eoc_token_id=fusion.end_of_chunk_token_id,
        media_token_id=fusion.image_token_id,
        vis_dim=vision,
        cross_attn_every_n_layers=1,
    )
    model.perceiver = PerceiverResampler(dim=vision, **PERCEIVER)
    compatible = positional_flamingo_layer()
    for layer in model.lang_encoder._get_decoder_layers():
        layer.__class__ = compatible
    # open_flamingo/src/factory.py: freeze everything, then train perceiver, xattn, input embeddings.
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1
    )
    host = to_device(served, device)
    vision_x = host["images"].unsqueeze(2)  # (B, T_img, F=1, C, H, W)

    def open_flamingo_step() -> None:  # open_flamingo/train/train_utils.py, one dataset
        with trainer.autocast():
            loss = model(
                vision_x=vision_x,
                lang_x=host["input_ids"],
                attention_mask=host["attention_mask"],
                labels=host["labels"],
            )[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    sizes = {
        "vision": f"timm {FLAMINGO_VISION['model']} 4 x {vision} at 64 px (frozen)",
        "lm": f"GPT-2 {layers} x {width}, {heads} heads, vocab {config.vocab_size} (frozen, random)",
        "perceiver": "2 layers, 16 latents, 8 heads x 64",
        "xattn": "before every LM layer, 8 heads x 64, ff x4",
        "batch": batch,
        "length": length,
        "images_per_sequence": FLAMINGO_IMAGES,
        "vlforge_trainable_params": trainable(trainer.model),
        "peer_trainable_params": trainable(model),
    }
    return trainer.train_step, open_flamingo_step, sizes


def fixed_interleaved_batch(sample: dict, fusion: nn.Module, batch: int, length: int) -> dict:
    """``FLAMINGO_IMAGES`` chunks per sequence (<image> text <|endofchunk|>), as bench/flamingo_step.py."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 60, (batch, length), generator=generator)
    chunk = length // FLAMINGO_IMAGES
    ids[:, ::chunk] = fusion.image_token_id
    ids[:, chunk - 1 :: chunk] = fusion.end_of_chunk_token_id
    mask = torch.ones_like(ids)
    side = FLAMINGO_VISION["img_size"]
    images = torch.randn(batch, FLAMINGO_IMAGES, 3, side, side, generator=generator)
    labels = interleaved_labels(ids, mask, fusion.image_token_id, fusion.end_of_chunk_token_id)
    return {**sample, "input_ids": ids, "attention_mask": mask, "images": images, "labels": labels}


# ---------------------------------------------------------------------------- timing


def steps_per_second(step: Callable[[], None], steps: int, device: torch.device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, 1 round of 1 step")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 4; smoke 1)")
    parser.add_argument("--steps", type=int, help="steps per side per round (default: FLIP 1, Flamingo 3)")
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "full"
    rounds = args.rounds or (1 if args.smoke else 3)
    load_before = os.getloadavg()
    started = time.perf_counter()

    rows, sizes = [], {}
    with tempfile.TemporaryDirectory() as root:
        for name, build, peer in (
            ("flip", flip_pair, "open_clip"),
            ("flamingo", flamingo_pair, "open_flamingo"),
        ):
            vlforge_step, peer_step, sizes[name] = build(SIZES[mode][name], root)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            vlforge_step(), peer_step()  # warm-up: allocator, thread pools, optimizer state
            steps = args.steps or SIZES[mode][name]["steps"]
            sizes[name]["steps_per_round"] = steps
            rates = {"vlforge": [], peer: []}
            for round_ in range(rounds):
                rates["vlforge"].append(steps_per_second(vlforge_step, steps, device))
                rates[peer].append(steps_per_second(peer_step, steps, device))
                print(
                    f"{name:<9} round {round_ + 1}/{rounds}  vlforge {rates['vlforge'][-1]:7.3f}  "
                    f"{peer} {rates[peer][-1]:7.3f} steps/s"
                )
            ours, theirs = statistics.median(rates["vlforge"]), statistics.median(rates[peer])
            rows.append(
                {
                    "pair": name,
                    "peer": peer,
                    "vlforge_steps_per_s": round(ours, 4),
                    "peer_steps_per_s": round(theirs, 4),
                    "ratio_vlforge_over_peer": round(ours / theirs, 3),
                    "all_rounds": {key: [round(r, 4) for r in value] for key, value in rates.items()},
                }
            )
            del vlforge_step, peer_step
    load_after = os.getloadavg()

    print(f"\n{'pair':<9} {'peer':<14} {'vlforge steps/s':>16} {'peer steps/s':>13} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['pair']:<9} {row['peer']:<14} {row['vlforge_steps_per_s']:>16.3f} "
            f"{row['peer_steps_per_s']:>13.3f} {row['ratio_vlforge_over_peer']:>6.2f}x"
        )
    print(f"goal: ratio ≥ 1.0x; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")

    from importlib.metadata import version

    import open_clip

    result = {
        "benchmark": "peers",
        "mode": mode,
        "rounds": rounds,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",  # load: below
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "open_clip": open_clip.__version__,
        "open_flamingo": version("open_flamingo"),
        "precision": "bf16 autocast" if torch.cuda.is_available() else "fp32",
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in load_after],
        "wall_s": round(time.perf_counter() - started, 1),
        "sizes": sizes,
        "results": rows,
    }
    record(f"peers{'_smoke' if args.smoke else ''}", result)


if __name__ == "__main__":
    main()
