"""AdamW step time per implementation (multi-tensor, for-loop, fused) on the peers benchmark's model.

    python bench/optimizer_step.py [--steps 5] [--threads 1]

The parameters are the FLIP pair's in bench/peers.py (timm ViT-B/16 at 112 px and a 12 x 512
BERT text tower, 124M parameters, fp32) with random gradients. Each implementation takes one
warm-up step (its state is allocated), then ``--steps`` timed steps; the median is reported.
vlforge uses the fused kernel where the device has one (vlforge.parallel.optimizer_options).
Writes bench/results/optimizer_step.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import timm
import torch
from record import record  # bench/ is on sys.path when run as a script
from transformers import BertConfig, BertModel

IMPLEMENTATIONS = {"foreach": {"foreach": True}, "for-loop": {"foreach": False}, "fused": {"fused": True}}


def flip_pair_parameters(device: torch.device) -> list[torch.nn.Parameter]:
    vision = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=112, num_classes=512)
    sizes = {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "intermediate_size": 2048}
    text = BertModel(BertConfig(vocab_size=36, max_position_embeddings=34, **sizes))
    params = [p for module in (vision, text) for p in module.to(device).parameters()]
    generator = torch.Generator(device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=generator) * 1e-3
    return params


def step_seconds(params: list[torch.nn.Parameter], options: dict, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.2, **options)
    synchronize = torch.cuda.synchronize if params[0].is_cuda else (lambda: None)
    optimizer.step()  # warm-up: exp_avg and exp_avg_sq allocated
    times = []
    for _ in range(steps):
        synchronize()
        start = time.perf_counter()
        optimizer.step()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = flip_pair_parameters(device)
    rows = {}
    for name, options in IMPLEMENTATIONS.items():
        times = step_seconds(params, options, args.steps)
        rows[name] = {"median_s": round(statistics.median(times), 4), "all_s": [round(t, 4) for t in times]}
        print(f"{name:9s} {rows[name]['median_s']:.3f} s per step")
    fused = rows["fused"]["median_s"]
    print(f"fused is {rows['foreach']['median_s'] / fused:.1f}x the multi-tensor path")
    record(
        "optimizer_step",
        {
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "threads": args.threads,
            "parameters": sum(p.numel() for p in params),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
