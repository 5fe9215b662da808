"""FLIP speed: image-tower forward+backward throughput of ViT-B/16 at 224 at mask ratio 0, 0.5, 0.75.

The tower is the one ``recipes/flip_*.toml`` build (``timm.vit`` with average pooling, sin-cos
positions and a projection, ``flip.random`` between ``embed`` and ``blocks``); one step is
forward, a scalar loss on the embeddings, and backward. The three ratios run in one process,
in interleaved rounds, so a change of machine load hits them alike; each figure is a median.

    python bench/flip_speed.py            # batch 64 on CPU (256 on CUDA), 5 rounds of 3 steps
    python bench/flip_speed.py --smoke    # batch 8, 2 rounds of 1 step
    python bench/flip_speed.py --profile  # also: where the time goes at each ratio (top ops)

Memory, per ratio:
* ``saved_activation_mb``: bytes autograd keeps for backward in one step (exact, any device);
  what masking saves, since weights and gradients do not depend on the ratio.
* ``peak_allocated_mb``: CUDA ``max_memory_allocated`` over the ratio's steps (CUDA only).
On CPU the process's peak RSS is reported once (it cannot be reset between ratios).

Goal: ≥ 1.8× at 0.5 and ≥ 3× at 0.75 (tokens drop 2× and 4×, attention more).
Writes bench/results/flip_speed.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from contextlib import nullcontext

import torch
from record import record  # bench/ is on sys.path when run as a script
from vlforge_plugins.flip.masking import RandomMasking, StepGenerator, keep_count

from vlforge.encoders import TimmViTConfig
from vlforge.encoders.vision import TimmViT, build_timm_vit

RATIOS = (0.0, 0.5, 0.75)
VIT_B16 = TimmViTConfig(
    model="vit_base_patch16_224",
    pool="avg",
    pos_embed="sincos",
    embed_dim=512,
    timm_kwargs={"pool_include_prefix": True},
)


def train_step(tower: TimmViT, masking: RandomMasking, images: torch.Tensor, autocast) -> None:
    with autocast():
        embedding = tower(images, masking=masking).embedding  # (B, 512)
    embedding.float().square().sum().backward()
    tower.zero_grad(set_to_none=True)


def saved_activation_bytes(tower: TimmViT, masking: RandomMasking, images: torch.Tensor, autocast) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (distinct storages)."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast():
        embedding = tower(images, masking=masking).embedding
    embedding.float().square().sum().backward()
    tower.zero_grad(set_to_none=True)
    weights = {p.untyped_storage().data_ptr() for p in tower.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in weights)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(tower, masking, images, autocast, steps: int) -> float:
    synchronize(images.device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(tower, masking, images, autocast)
    synchronize(images.device)
    return steps * images.shape[0] / (time.perf_counter() - start)


def profile_top_ops(tower, masking, images, autocast, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if images.is_cuda else [])
    with profile(activities=activities) as prof:
        train_step(tower, masking, images, autocast)
        synchronize(images.device)
    key = "self_cuda_time_total" if images.is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="batch 8, 2 rounds of 1 step")
    parser.add_argument("--batch", type=int, help="images per step (default 64 CPU, 256 CUDA; smoke 8)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; smoke 2)")
    parser.add_argument("--steps", type=int, help="steps per ratio per round (default 3; smoke 1)")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one step per ratio")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (8 if args.smoke else 256 if device.type == "cuda" else 64)
    rounds = args.rounds or (2 if args.smoke else 5)
    steps = args.steps or (1 if args.smoke else 3)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    )

    torch.manual_seed(0)
    tower = build_timm_vit(VIT_B16).to(device).train()
    images = torch.randn(batch, 3, 224, 224, device=device)
    maskings = {ratio: RandomMasking(ratio, StepGenerator(0, "bench")).train() for ratio in RATIOS}
    patches = tower.vit.patch_embed.num_patches

    rates: dict[float, list[float]] = {ratio: [] for ratio in RATIOS}
    peaks: dict[float, float | None] = {}
    for ratio in RATIOS:  # warm-up (allocator, thread pools, kernels) and memory, one ratio at a time
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_step(tower, maskings[ratio], images, autocast)
        peaks[ratio] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    for round_ in range(rounds):
        for ratio in RATIOS:
            rates[ratio].append(images_per_second(tower, maskings[ratio], images, autocast, steps))
            print(f"round {round_ + 1}/{rounds}  ratio {ratio:<4}  {rates[ratio][-1]:8.2f} images/s")

    base = statistics.median(rates[0.0])
    results = []
    for ratio in RATIOS:
        rate = statistics.median(rates[ratio])
        saved = saved_activation_bytes(tower, maskings[ratio], images, autocast) / 2**20
        results.append(
            {
                "ratio": ratio,
                "tokens": keep_count(patches, ratio) + tower.num_prefix_tokens,
                "images_per_s": round(rate, 3),
                "speedup": round(rate / base, 3),
                "saved_activation_mb": round(saved, 1),
                "peak_allocated_mb": None if peaks[ratio] is None else round(peaks[ratio], 1),
                "all_rounds": [round(r, 3) for r in rates[ratio]],
            }
        )
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    print(f"\nViT-B/16 @224, batch {batch}, {device}, {torch.get_num_threads()} threads, median of {rounds}")
    print(f"{'ratio':>6} {'tokens':>7} {'images/s':>10} {'speed-up':>9} {'saved act. MB':>14} {'peak MB':>8}")
    for row in results:
        peak = "-" if row["peak_allocated_mb"] is None else f"{row['peak_allocated_mb']:.0f}"
        print(
            f"{row['ratio']:>6} {row['tokens']:>7} {row['images_per_s']:>10.2f} {row['speedup']:>8.2f}x "
            f"{row['saved_activation_mb']:>14.1f} {peak:>8}"
        )
    if device.type == "cpu":
        print(f"process peak RSS {peak_rss_mb:.0f} MB (all ratios together)")
    print("goal: ≥ 1.8x at 0.5, ≥ 3x at 0.75")
    if args.profile:
        for ratio in RATIOS:
            print(f"\n--- one step at ratio {ratio}")
            print(profile_top_ops(tower, maskings[ratio], images, autocast))

    result = {
        "benchmark": "flip_speed",
        "mode": "smoke" if args.smoke else "full",
        "model": "vit_base_patch16_224 (timm.vit, avg pool, sin-cos, 512-d projection)",
        "step": "forward + backward of the image tower",
        "batch": batch,
        "rounds": rounds,
        "steps_per_round": steps,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "torch": torch.__version__,
        "process_peak_rss_mb": round(peak_rss_mb, 1),
        "results": results,
    }
    record("flip_speed", result)


if __name__ == "__main__":
    main()
