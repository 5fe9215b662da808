"""Flamingo training-step cost against the density of gated cross-attention (every 1, 2, 4 layers).

The same frozen ViT, Perceiver and frozen GPT-2-style LM, with a GATED
XATTN-DENSE block before every N-th decoder layer; one fixed batch of
interleaved sequences; a step is forward + backward + AdamW. Rounds
alternate between the three models so that machine noise hits them alike;
the median step time of each is reported, with the speed ratio to N = 1
(paper, Flamingo-3B ablation: every 4th layer trains ≈66% faster than every
layer), the trainable-parameter fraction, and memory: peak allocated on
CUDA, and on every device the bytes of activations saved for backward.

    python bench/flamingo_step.py            # the small LM (8 layers, width 512)
    python bench/flamingo_step.py --smoke    # a few seconds, tiny sizes

Prints a table and writes bench/results/flamingo_step.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from record import record  # bench/ is on sys.path when run as a script
from vlforge_plugins.flamingo import GatedXAttnConfig, PerceiverConfig, build_gated_xattn, build_perceiver
from vlforge_plugins.flamingo.data import interleaved_labels
from vlforge_plugins.flamingo.objective import lm_loss

from vlforge.components import BuildContext
from vlforge.encoders import TimmViTConfig, build_timm_vit

EVERY = (1, 2, 4)
SIZES = {  # LM width/layers/heads, vision width, batch, text length, images per sequence
    "full": {"width": 512, "layers": 8, "heads": 8, "vision": 192, "batch": 8, "length": 256, "images": 4},
    "smoke": {"width": 128, "layers": 4, "heads": 4, "vision": 64, "batch": 4, "length": 64, "images": 2},
}


def build(every: int, size: dict, device: torch.device) -> SimpleNamespace:
    torch.manual_seed(0)
    ctx = BuildContext(recipe=None)
    vision = TimmViTConfig(
        model="vit_tiny_patch16_224", img_size=64, patch_size=16, width=size["vision"], depth=4, heads=4
    )
    ctx.parts["vision"] = build_timm_vit(vision, ctx)
    ctx.parts["adapter"] = build_perceiver(PerceiverConfig(depth=2, num_latents=16), ctx)
    lm = {
        "model_type": "gpt2",
        "n_embd": size["width"],
        "n_layer": size["layers"],
        "n_head": size["heads"],
        "n_positions": size["length"],
    }
    fusion = GatedXAttnConfig(lm_config=lm, tokenizer="flamingo:shapes", every=every)
    ctx.parts["fusion"] = build_gated_xattn(fusion, ctx)
    for part in ctx.parts.values():
        part.to(device)
    return SimpleNamespace(**ctx.parts)


def make_batch(parts: SimpleNamespace, size: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Sequences of ``images`` chunks: <image> then text tied to it, <|endofchunk|>, repeated."""
    generator = torch.Generator().manual_seed(0)
    fusion, length, images = parts.fusion, size["length"], size["images"]
    ids = torch.randint(4, 60, (size["batch"], length), generator=generator)
    chunk = length // images
    ids[:, ::chunk] = fusion.image_token_id
    ids[:, chunk - 1 :: chunk] = fusion.end_of_chunk_token_id
    mask = torch.ones_like(ids)
    pixels = torch.randn(size["batch"], images, 3, 64, 64, generator=generator)
    labels = interleaved_labels(ids, mask, fusion.image_token_id, fusion.end_of_chunk_token_id)
    batch = {"input_ids": ids, "attention_mask": mask, "images": pixels, "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def loss_of(parts: SimpleNamespace, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    media = parts.adapter.encode_images(parts.vision, batch["images"])
    logits = parts.fusion(batch["input_ids"], batch["attention_mask"], media).logits
    return lm_loss(logits, batch["labels"])


def saved_activation_bytes(parts: SimpleNamespace, batch: dict[str, torch.Tensor], autocast) -> int:
    """Bytes of the tensors autograd keeps for backward (weights excluded), on any device."""
    weights = {p.untyped_storage().data_ptr() for part in vars(parts).values() for p in part.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast():
        loss = loss_of(parts, batch)
    del loss
    return sum(storages.values())


class Model:
    """One xattn density: its parts, optimizer and timing."""

    def __init__(self, every: int, size: dict, device: torch.device) -> None:
        self.every = every
        self.parts = build(every, size, device)
        params = [p for part in vars(self.parts).values() for p in part.parameters()]
        self.total = sum(p.numel() for p in params)
        self.trainable = sum(p.numel() for p in params if p.requires_grad)
        embedding = self.parts.fusion.lm.get_input_embeddings().weight
        self.trainable_rows_only = self.trainable - embedding.numel() + 2 * embedding.shape[1]
        self.optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
        self.times: list[float] = []

    def step(self, batch: dict[str, torch.Tensor], autocast, device: torch.device) -> float:
        start = time.perf_counter()
        with autocast():
            loss = loss_of(self.parts, batch)
        loss.backward()
        self.parts.fusion.mask_embedding_grad()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    steps = args.steps or (3 if args.smoke else 10)
    rounds = args.rounds or (2 if args.smoke else 5)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    )

    models = [Model(every, size, device) for every in EVERY]
    batch = make_batch(models[0].parts, size, device)
    memory = {}
    for model in models:
        model.step(batch, autocast, device)  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            model.step(batch, autocast, device)
            memory[model.every] = torch.cuda.max_memory_allocated()
    for _ in range(rounds):
        for model in models:
            model.times += [model.step(batch, autocast, device) for _ in range(steps)]

    base = statistics.median(models[0].times)
    rows = []
    for model in models:
        median = statistics.median(model.times)
        rows.append(
            {
                "every": model.every,
                "blocks": len(model.parts.fusion.xattn),
                "step_ms": round(1000 * median, 2),
                "speedup_vs_every_1": round(base / median, 3),
                "total_params": model.total,
                "trainable_params": model.trainable,
                "trainable_fraction": round(model.trainable / model.total, 4),
                "trainable_fraction_embedding_rows_only": round(model.trainable_rows_only / model.total, 4),
                "saved_activation_mb": round(saved_activation_bytes(model.parts, batch, autocast) / 2**20, 2),
                "peak_allocated_mb": round(memory[model.every] / 2**20, 1) if model.every in memory else None,
            }
        )
    columns = [  # (header, key, width, format)
        ("every", "every", 5, "d"),
        ("blocks", "blocks", 6, "d"),
        ("step ms", "step_ms", 9, ".2f"),
        ("speedup", "speedup_vs_every_1", 8, ".3f"),
        ("trainable", "trainable_fraction", 10, ".2%"),
        ("saved MB", "saved_activation_mb", 9, ".2f"),
        ("peak MB", "peak_allocated_mb", 8, ".1f"),
    ]
    print(" ".join(f"{header:>{width}}" for header, _, width, _ in columns))
    for row in rows:
        cells = [
            format(row[key], f">{width}{spec}") if row[key] is not None else "-".rjust(width)
            for _, key, width, spec in columns
        ]
        print(" ".join(cells))
    result = {
        "benchmark": "flamingo_step",
        "mode": "smoke" if args.smoke else "full",
        "sizes": size,
        "steps_per_round": steps,
        "rounds": rounds,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "paper": "Flamingo-3B ablation: xattn every 4th layer ≈66% faster than every layer",
        "results": rows,
    }
    path = record("flamingo_step", result)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
