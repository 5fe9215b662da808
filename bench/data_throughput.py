"""Data loading throughput: decode + augment + collate of 224-px JPEGs from local WebDataset shards.

The real train stream (``webdataset`` source, ``ShardedStream``) with FLIP's
augmentation (RandomResizedCrop scale 0.5-1 at 224, flip), ViT-H/14's
preprocessing (CLIP mean/std, bicubic) and BERT tokenization to 32 tokens,
timed with 0, 1 and 2 DataLoader workers (0: all in the training process,
with one torch thread like a worker has). The stream is endless, so a timed
round may run over several epochs; it is long against the prefetch depth
(2 batches per worker) so that it measures production, not the buffer.

Then: how many workers keep one A100 busy on FLIP ViT-H/14 at 256 images per
GPU. The step time is an estimate, not a measurement (no GPU here):
6 x parameters x tokens FLOPs per sample for forward + backward, the vision
tower (632M parameters, timm vit_huge_patch14_224) on 50% of 256 patches
plus CLS, the text tower (354M, open_clip ViT-H-14's 24 x 1024) on 32
tokens, at 40% of the A100's 312 TFLOP/s bf16 peak.

    python bench/data_throughput.py            # 1024 images, 3 rounds of 40 batches of 32
    python bench/data_throughput.py --smoke    # 256 images, 1 round of 12 batches

Prints a table and writes bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from record import record  # bench/ is on sys.path when run as a script

from vlforge import data
from vlforge.components import BuildContext
from vlforge.data.pack import pack
from vlforge.data.tokenizers import load_tokenizer

BERT = Path(__file__).resolve().parents[1] / "plugins" / "flip" / "tokenizers" / "bert-base-uncased"
VIT_H_DATA_CONFIG = {  # open_clip / timm ViT-H-14 CLIP preprocessing
    "input_size": (3, 224, 224),
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
    "crop_pct": 1.0,
}
FLIP_IMAGE = {"crop_scale": (0.5, 1.0), "hflip": 0.5}  # methods.md §3.5

# The assumed A100 step of FLIP ViT-H/14 at 256 images per GPU (see the module docstring).
VISION_PARAMS, VISION_TOKENS = 632e6, 256 // 2 + 1
TEXT_PARAMS, TEXT_TOKENS = 354e6, 32
A100_BF16_PEAK, ASSUMED_MFU, PER_GPU_BATCH = 312e12, 0.40, 256


def assumed_step_seconds() -> float:
    flops_per_sample = 6 * (VISION_PARAMS * VISION_TOKENS + TEXT_PARAMS * TEXT_TOKENS)
    return PER_GPU_BATCH * flops_per_sample / (A100_BF16_PEAK * ASSUMED_MFU)


def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random colour field plus fine noise: compresses about like a resized web photo."""
    coarse = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8))


def write_images(folder: Path, count: int, size: int) -> float:
    """``count`` JPEGs (quality 90) with .txt captions; returns their mean size in bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = []
    for index in range(count):
        buffer = io.BytesIO()
        photo_like(rng, size).save(buffer, format="JPEG", quality=90)
        (folder / f"{index:06d}.jpg").write_bytes(buffer.getvalue())
        (folder / f"{index:06d}.txt").write_text(f"a photo number {index} of a smooth colourful pattern")
        sizes.append(len(buffer.getvalue()))
    return statistics.mean(sizes)


class Vision:
    data_config = VIT_H_DATA_CONFIG


class Text:
    """BERT WordPiece to 32 tokens, padded to length (FLIP's text input)."""

    def __init__(self) -> None:
        self.tokenizer = load_tokenizer(str(BERT) if BERT.is_dir() else "vlforge:shapes")

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt"
        )


def samples_per_second(urls: str, *, workers: int, batch: int, batches: int, warmup: int) -> float:
    ctx = BuildContext(recipe=None, parts={"vision": Vision(), "text": Text()})
    source = data.build_webdataset(data.WebDatasetConfig(urls=urls, image=FLIP_IMAGE, shuffle_block=256), ctx)
    stream = source.train_stream(micro_batch=batch, seed=0, num_workers=workers, rank=0, world_size=1)
    for _ in range(warmup):  # worker start-up and first shard opens
        stream.next()
    start = time.perf_counter()
    for _ in range(batches):
        images = stream.next()["images"]
    elapsed = time.perf_counter() - start
    assert images.shape == (batch, 3, 224, 224)
    return batches * batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="256 images, one short round")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per worker count (median kept)")
    args = parser.parse_args()
    images = 256 if args.smoke else args.images
    rounds = 1 if args.smoke else args.rounds
    batch, per_round = args.batch, (12 if args.smoke else args.batches)
    torch.set_num_threads(1)  # the 0-worker case: one thread, as each DataLoader worker has

    with tempfile.TemporaryDirectory() as tmp:
        jpeg_bytes = write_images(Path(tmp) / "images", images, 224)
        report = pack(str(Path(tmp) / "images"), f"{tmp}/shards", shard_size=64, progress=False)
        urls = f"{tmp}/shards/{{00000..{len(report.shards) - 1:05d}}}.tar"
        rates = {}
        for workers in (0, 1, 2):
            runs = [
                samples_per_second(urls, workers=workers, batch=batch, batches=per_round, warmup=2)
                for _ in range(rounds)
            ]
            rates[workers] = statistics.median(runs)
            print(
                f"  {workers} worker(s): {rates[workers]:8.1f} samples/s (rounds: {[round(r) for r in runs]})"
            )

    per_worker = rates[1]
    step_s = assumed_step_seconds()
    needed = PER_GPU_BATCH / step_s
    result = {
        "smoke": args.smoke,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "setup": {
            "images": images,
            "jpeg_mean_bytes": round(jpeg_bytes),
            "image_size": 224,
            "batch": batch,
            "augment": "RandomResizedCrop(224, scale 0.5-1, bicubic) + hflip 0.5, CLIP mean/std",
            "text": "BERT WordPiece, 32 tokens" if BERT.is_dir() else "vlforge:shapes word-level",
            "timed_batches_per_round": per_round,
            "rounds": rounds,
        },
        "samples_per_s": {f"workers_{w}": round(r, 1) for w, r in rates.items()},
        "per_worker_samples_per_s": round(per_worker, 1),
        "scaling_1_to_2_workers": round(rates[2] / rates[1], 2),
        "flip_vith14_a100": {
            "assumed_step_s": round(step_s, 2),
            "assumption": (
                "6*N*T FLOPs/sample: vision 632M params x 129 tokens (50% masking), text 354M x 32; "
                "256 samples/GPU; A100 312 TFLOP/s bf16 at 40% MFU"
            ),
            "samples_per_s_needed_per_gpu": round(needed, 1),
            "workers_needed_per_gpu": math.ceil(needed / per_worker),
        },
    }
    print(
        f"per worker {per_worker:.0f} samples/s, 1->2 workers x{result['scaling_1_to_2_workers']}; "
        f"FLIP ViT-H/14 A100 step ~{step_s:.2f} s (assumed) needs {needed:.0f} samples/s/GPU "
        f"= {result['flip_vith14_a100']['workers_needed_per_gpu']} workers per GPU"
    )
    record("data_throughput", result)


if __name__ == "__main__":
    main()
