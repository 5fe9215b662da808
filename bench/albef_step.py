"""ALBEF step time on CPU, broken down: student forward/backward, teacher forward, EMA, queue update.

The tiny ALBEF recipe (recipes/albef_tiny.toml, sizes overridable) is stepped as
the engine steps it: forward of all three objectives (which runs the momentum
teacher and the queue update inside), backward, AdamW, then the EMA update.
The teacher forward (image, text and the MLM pass on masked ids) and the queue
update are also timed on their own on the same batch, so the student's share
of the forward is the forward minus those two. Medians over the timed steps.

    python bench/albef_step.py            # 30 timed steps
    python bench/albef_step.py --smoke    # 5 timed steps, to check it runs

Goal: EMA update + queue update under 5% of the step. Writes bench/results/albef_step.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from record import record  # bench/ is on sys.path when run as a script
from vlforge_plugins.albef.mlm import mask_tokens, masked_logits

from vlforge.components import BuildContext
from vlforge.engine import parameter_groups
from vlforge.model import Progress, Step, build_component, build_model
from vlforge.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "albef_tiny.toml"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1e3, out


def teacher_forward(model, batch, progress: Progress) -> None:
    """What the teacher computes in one ALBEF step: image and text features, the MLM pass."""
    step, teacher, mlm = Step(model, batch, progress), model.teacher, model.objectives["mlm"]
    with torch.no_grad():
        image = teacher.image(step)
        teacher.text(step)
        masked, labels = mask_tokens(
            batch["input_ids"], vocab_size=mlm.vocab_size, mask_id=mlm.mask_id, never_mask=mlm.never_mask
        )
        masked_logits(
            teacher.parts["text"],
            teacher.parts["fusion"],
            masked,
            batch["attention_mask"],
            image.tokens,
            labels != -100,
        )


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    recipe, plugins = load_recipe(RECIPE, ["evaluators={}", *overrides])
    ctx = BuildContext(recipe)
    model = build_model(recipe, plugins, ctx)
    data = build_component(plugins, "dataset", recipe.data, ctx)
    train = data.dataset("train")
    batch = data.collate([train[i] for i in range(recipe.train.batch_size)])
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe.optim), lr=recipe.optim.lr)
    itc = model.objectives["itc"]
    # Past the α warm-up, so the MLM distillation pass runs as in most of training.
    progress = Progress(step=10**6, steps_per_epoch=1)
    features = torch.randn(recipe.train.batch_size, itc.image_queue.shape[1])  # (B, E) to enqueue
    times: dict[str, list[float]] = {}
    for index in range(warmup + steps):
        row = {}
        row["forward"], (loss, _) = timed(lambda: model(batch, progress))
        row["backward"], _ = timed(loss.backward)
        row["optimizer"], _ = timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        row["ema_update"], _ = timed(model.teacher.update)
        row["teacher_forward"], _ = timed(lambda: teacher_forward(model, batch, progress))
        row["queue_update"], _ = timed(lambda: itc.enqueue(features, features))
        if index >= warmup:
            for name, value in row.items():
                times.setdefault(name, []).append(value)
    ms = {name: statistics.median(values) for name, values in times.items()}
    ms["step"] = ms["forward"] + ms["backward"] + ms["optimizer"] + ms["ema_update"]
    ms["student_forward"] = ms["forward"] - ms["teacher_forward"] - ms["queue_update"]
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "overrides": overrides,
        "batch_size": recipe.train.batch_size,
        "queue_size": itc.queue_size,
        "trainable_parameters": parameters,
        "median_ms": {name: round(value, 3) for name, value in sorted(ms.items())},
        "ema_plus_queue_fraction": round((ms["ema_update"] + ms["queue_update"]) / ms["step"], 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="5 timed steps after 1 warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "overrides", nargs="*", help="recipe overrides, e.g. model.text.config.hidden_size=128"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, warmup = (5, 1) if args.smoke else (30, 3)
    result = measure(args.overrides, steps, warmup)
    result |= {
        "recipe": str(RECIPE.relative_to(RECIPE.parents[1])),
        "timed_steps": steps,
        "threads": args.threads,
        "smoke": args.smoke,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "goal": "ema_plus_queue_fraction < 0.05",
    }
    print(f"{'part':<18} median ms")
    for name, value in result["median_ms"].items():
        print(f"{name:<18} {value:9.2f}")
    fraction = result["ema_plus_queue_fraction"]
    print(f"EMA + queue update: {100 * fraction:.2f}% of the step (goal < 5%)")
    record("albef_step", result)


if __name__ == "__main__":
    main()
