"""Worker for the 2-rank evaluation test: imported by name in spawned children, so not a test module.

Each case is a tiny recipe whose held-out split (and ALBEF's ITM query groups, Flamingo's
query batches) does not divide evenly over two ranks, so one rank runs a padding batch.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from vlforge.distributed import leave_group

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
COMMON = ["train.progress=false", "train.steps=1"]
CASES = {
    # CLIP: retrieval (3 batches of 16 over 40 items) and zero-shot colour (prompts and images).
    "clip": (
        "quickstart.toml",
        [
            "data.val_size=40",
            "evaluators.retrieval.batch_size=16",
            "evaluators.zeroshot.batch_size=13",
            'evaluators.shape.type="zeroshot"',
            'evaluators.shape.attribute="shape"',
            "evaluators.shape.batch_size=7",
            'evaluators.whole.type="retrieval"',  # one batch: rank 1 runs only the padding batch
            "evaluators.whole.batch_size=64",
        ],
    ),
    # ALBEF: ITC retrieval and ITM re-ranking of the top 4, one query per ITM call (15 queries).
    "albef": (
        "albef_tiny.toml",
        [
            "model.vision.patch_size=8",
            "train.batch_size=8",
            "objectives.itc.queue_size=16",
            "data.train_size=64",
            "data.val_size=15",
            "evaluators.retrieval.k=4",
            "evaluators.retrieval.batch_size=6",
        ],
    ),
    # Flamingo: 0- and 2-shot VQA and captioning, 5 queries in batches of 2.
    "flamingo": (
        "flamingo_tiny.toml",
        [
            "train.batch_size=8",
            "data.sources.interleaved.size=64",
            "data.sources.pairs.size=64",
            "evaluators.vqa.num_queries=5",
            "evaluators.vqa.batch_size=2",
            "evaluators.caption.num_queries=5",
            "evaluators.caption.batch_size=2",
            "evaluators.caption.max_new_tokens=4",
            # VQAv2-style few-shot on a VQA file (write_vqa_file): 5 questions in batches of 2.
            'evaluators.vqav2={type="flamingo.fewshot", task="vqa", source="data", shots=[0, 2], '
            'batch_size=2, max_new_tokens=3, data={type="vqa", splits={val="$OUT/vqa.jsonl", '
            'train="$OUT/vqa.jsonl"}}}',
        ],
    ),
}


def write_vqa_file(out_dir: Path) -> None:
    """``$OUT/vqa.jsonl``: a question on each of 5 shapes JPEGs, its 10 answers from the caption's words."""
    from vlforge.data.pack import write_shapes_folder

    lines = []
    for path in write_shapes_folder(out_dir / "vqa_images", 5, image_size=32):
        words = path.with_suffix(".txt").read_text().split()
        answers = [words[1]] * 6 + words[2:6]  # a majority and four others
        lines.append(json.dumps({"image": str(path), "question": "What is it?", "answers": answers}))
    (out_dir / "vqa.jsonl").write_text("\n".join(lines) + "\n")


def evaluate_cases(run_dir: str) -> dict[str, dict[str, dict[str, float]]]:
    from vlforge.engine import Trainer
    from vlforge.recipe import load_recipe

    results = {}
    for case, (recipe_name, overrides) in CASES.items():
        overrides = [override.replace("$OUT", run_dir) for override in overrides]
        recipe, plugins = load_recipe(RECIPES / recipe_name, [*COMMON, *overrides])
        results[case] = Trainer(recipe, plugins, f"{run_dir}/{case}").evaluate()
    return results


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    """Every rank evaluates every case; each saves what it returned."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    torch.save(evaluate_cases(out_dir), f"{out_dir}/world{world}_rank{rank}.pt")
    leave_group()
