"""Flamingo in the engine: generated data, accumulation over datasets, recipes, few-shot evaluation."""

from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from vlforge_plugins.flamingo.data import IGNORE
from vlforge_plugins.flamingo.objective import lm_loss

from vlforge.cli import main
from vlforge.components import BuildContext
from vlforge.data.pack import pack, write_shapes_folder
from vlforge.data.synthetic import ShapesDataset
from vlforge.engine import Trainer
from vlforge.hookspecs import hookimpl
from vlforge.model import build_model, parameter_counts
from vlforge.recipe import load_recipe
from vlforge.results.queries import query

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
TINY = RECIPES / "flamingo_tiny.toml"
SMALL = [  # the tiny recipe, smaller still
    "train.batch_size=8",
    "train.progress=false",
    "evaluators.vqa.num_queries=4",
    "evaluators.caption.num_queries=4",
    "evaluators.caption.max_new_tokens=4",
    "data.sources.interleaved.size=64",
    "data.sources.pairs.size=64",
]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> Trainer:
    recipe, plugins = load_recipe(TINY, [*SMALL, "train.steps=1"])
    return Trainer(recipe, plugins, str(tmp_path_factory.mktemp("run")))


def test_generated_documents_supervise_only_text_tied_to_an_image(trainer):
    source, fusion = trainer.data.sources["interleaved"], trainer.model.fusion
    batch = source.collate([source.dataset("train")[i] for i in range(8)])
    ids, labels, images = batch["input_ids"], batch["labels"], batch["images"]
    image_counts = (ids == fusion.image_token_id).sum(dim=1)  # (B,)
    assert images.shape[:2] == (8, image_counts.max()) and image_counts.min() >= 1 and image_counts.max() <= 3
    for row, count in enumerate(image_counts.tolist()):
        assert images[row, :count].abs().sum(dim=(1, 2, 3)).gt(0).all() and not images[row, count:].any()
        tokens = fusion.tokenizer.convert_ids_to_tokens(ids[row])
        supervised = [t for t, label in zip(tokens, labels[row].tolist()) if label != IGNORE]
        assert supervised.count("<|endofchunk|>") == count  # every chunk's end is predicted
        assert not {"here", "next", "[PAD]", "<image>", "[SEP]"} & set(supervised)  # untied text, pad, image


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.accum_steps=3", "train.batch_size=9"], r"accum_steps \(3\) must be a multiple of .* \(2\)"),
        (["data.mode=sample"], r"need \[data\] type = 'mix' with mode = 'cycle'"),
        (["objectives.lm.dataset_weights={interleaved=1.0}"], r"exactly these sources"),
    ],
)
def test_dataset_weights_need_a_batch_of_every_dataset_per_step(overrides, message):
    recipe, plugins = load_recipe(TINY, [*SMALL, *overrides])
    with pytest.raises(ValueError, match=message):
        build_model(recipe, plugins, BuildContext(recipe))


def test_a_step_sums_the_weighted_losses_of_one_batch_per_dataset(trainer):
    """Engine accumulation over the mixture == backward of λ1·L1 + λ2·L2; one optimizer step."""
    model, stream = trainer.model, trainer.stream
    initial = copy.deepcopy(model.state_dict())
    drawn, grads, optimizer_steps = [], {}, []

    class Recording:  # the engine only calls next() and reads epoch
        epoch = 0

        def next(self):
            drawn.append(stream.next())
            return drawn[-1]

    class Spy:
        @hookimpl(trylast=True)  # after the fusion has masked its embedding gradient
        def vlforge_after_backward(self, state):
            grads.update({n: p.grad.clone() for n, p in state.model.named_parameters() if p.grad is not None})

        @hookimpl
        def vlforge_after_optimizer_step(self, state):
            optimizer_steps.append(state.step)

    trainer.stream = Recording()
    trainer.plugins.register_component(Spy(), "spy")
    model.train()  # as an evaluator leaves it
    trainer.train_step()
    assert [batch["dataset"] for batch in drawn] == ["interleaved", "pairs"] and optimizer_steps == [1]
    assert not model.vision.training and model.fusion.training  # the frozen encoder went back to eval

    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    nll = {}
    for batch in drawn:
        media = model.adapter.encode_images(model.vision, batch["images"])
        logits = model.fusion(batch["input_ids"], batch["attention_mask"], media).logits
        nll[batch["dataset"]] = lm_loss(logits, batch["labels"])
    (1.0 * nll["interleaved"] + 0.2 * nll["pairs"]).backward()
    model.fusion.mask_embedding_grad()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and len(grads) > 20
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fewshot_evaluator_reports_every_shot_and_chance(trainer):
    results = {
        name: evaluator.evaluate(trainer.model, trainer.ctx) for name, evaluator in trainer.evaluators.items()
    }
    assert results["vqa"].keys() == {"0shot_accuracy", "2shot_accuracy", "chance"}
    assert results["vqa"]["chance"] == 1 / 8
    assert results["caption"].keys() == {
        "0shot_cider",
        "0shot_exact_match",
        "2shot_cider",
        "2shot_exact_match",
    }
    assert all(0 <= value <= 1000 for metrics in results.values() for value in metrics.values())


@pytest.mark.parametrize(
    ("recipe", "blocks", "total"), [("flamingo_3b", 24, 2.56e9), ("flamingo_9b", 8, 8.13e9)]
)
def test_large_recipes_dry_run_on_the_meta_device(recipe, blocks, total, capsys):
    assert main(["run", str(RECIPES / f"{recipe}.toml"), "--dry-run", "--launcher", "local"]) == 0
    printed = {
        line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")
    }
    assert printed["vision"].endswith("(0.00M trainable)") and "total" in printed
    parsed, plugins = load_recipe(RECIPES / f"{recipe}.toml")
    headline = {name: (e.config.task, e.data.type, e.config.shots) for name, e in parsed.evaluators.items()}
    assert headline == {"coco": ("caption", "captions", [0, 4, 32]), "vqav2": ("vqa", "vqa", [0, 4, 32])}
    model = build_model(parsed, plugins, BuildContext(parsed, device="meta", meta=True))
    assert len(model.fusion.xattn) == blocks and model.fusion.lm.device.type == "meta"
    counts = parameter_counts(model)
    assert sum(n for n, _ in counts.values()) == pytest.approx(total, rel=0.01)
    assert counts["vision"][1] == 0 and counts["adapter"][0] == counts["adapter"][1]


@pytest.mark.slow
def test_tiny_recipe_trains_end_to_end_and_indexes_per_dataset_losses(tmp_path, monkeypatch):
    runs_root = tmp_path / "runs"
    monkeypatch.setenv("VLFORGE_RUNS", str(runs_root))
    code = main(["run", str(TINY), *SMALL, "train.steps=4", "train.log_every=1"])
    assert code == 0
    names = json.loads(query(str(runs_root), "SELECT DISTINCT name FROM metrics", "json"))
    assert {"train/lm.interleaved", "train/lm.pairs", "train/loss"} <= {row["name"] for row in names}
    evals = json.loads(query(str(runs_root), "SELECT evaluator, metric FROM evals", "json"))
    assert {("vqa", "2shot_accuracy"), ("caption", "2shot_cider")} <= {
        (e["evaluator"], e["metric"]) for e in evals
    }


def mmc4_file(path: Path, documents: int) -> Path:
    """MMC4-style JSONL: each document has two shapes images (base64 JPEG) matched to their captions."""
    shapes = ShapesDataset(seed=0, split="train", length=2 * documents, image_size=32, noise=0.05)
    lines = []
    for index in range(documents):
        first, second = shapes[2 * index], shapes[2 * index + 1]
        images = []
        for item, sentence in ((first, 1), (second, 3)):
            buffer = io.BytesIO()
            Image.fromarray(item["image"]).save(buffer, format="JPEG")
            images.append(
                {"image_base64": base64.b64encode(buffer.getvalue()).decode(), "matched_text_index": sentence}
            )
        text = ["here are some pictures", first["caption"], "now something else", second["caption"]]
        lines.append(json.dumps({"text_list": text, "image_info": images}))
    path.write_text("\n".join(lines))
    return path


@pytest.mark.slow
def test_core_readers_feed_flamingo_through_the_plugin_collates(tmp_path, monkeypatch):
    """The flamingo_3b data path at tiny scale: interleaved JSONL + WebDataset shards, mixed in cycle."""
    monkeypatch.setenv("VLFORGE_RUNS", str(tmp_path / "runs"))
    write_shapes_folder(tmp_path / "pairs", 32, image_size=32)
    pack(str(tmp_path / "pairs"), str(tmp_path / "shards"), shard_size=16, progress=False)
    collates = "vlforge_plugins.flamingo.data:make"
    sources = [
        f'data.sources.interleaved={{type="interleaved", files="{mmc4_file(tmp_path / "docs.jsonl", 32)}", '
        f'collate="{collates}_document_collate"}}',
        f'data.sources.pairs={{type="webdataset", urls="{tmp_path}/shards/{{00000..00001}}.tar", '
        f'collate="{collates}_pair_collate"}}',
    ]
    assert main(["run", str(TINY), *SMALL, *sources, "train.steps=2", "train.log_every=1"]) == 0
    rows = json.loads(query(str(tmp_path / "runs"), "SELECT name, value FROM metrics WHERE step = 2", "json"))
    losses = {row["name"]: row["value"] for row in rows}
    assert losses["train/loss"] == pytest.approx(losses["train/lm.interleaved"] + losses["train/lm.pairs"])
    assert 0 < losses["train/lm.pairs"] < losses["train/lm.interleaved"]  # λ = 0.2 against 1.0


def test_fewshot_captioning_on_a_caption_file_scores_against_every_caption(tmp_path, monkeypatch):
    """``source = "data"``: queries and examples from the evaluator's caption file (COCO's layout)."""
    from vlforge_plugins.flamingo import fewshot

    paths = write_shapes_folder(tmp_path / "images", 5, image_size=32)
    lines = [
        json.dumps({"image": f"images/{path.name}", "image_id": index, "caption": text})
        for index, path in enumerate(paths)
        for text in (path.with_suffix(".txt").read_text(), f"picture {index}")
    ]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    table = [
        'evaluators.coco.type="flamingo.fewshot"',
        'evaluators.coco.task="caption"',
        'evaluators.coco.source="data"',
        'evaluators.coco.split="test"',
        'evaluators.coco.support_split="test"',
        "evaluators.coco.shots=[0, 1]",
        "evaluators.coco.num_queries=100",  # more than the file holds: all 5 images
        "evaluators.coco.max_new_tokens=3",
        'evaluators.coco.data.type="captions"',
        f'evaluators.coco.data.files="{tmp_path / "test.jsonl"}"',
        f'evaluators.coco.data.splits.test="{tmp_path / "test.jsonl"}"',
    ]
    recipe, plugins = load_recipe(TINY, [*SMALL, "train.steps=1", *table])
    trainer = Trainer(recipe, plugins, str(tmp_path / "run"))
    scored: list[list[list[str]]] = []
    score = fewshot.FewShotEvaluator.score
    monkeypatch.setattr(
        fewshot.FewShotEvaluator, "score", lambda self, k, p, r: scored.append(r) or score(self, k, p, r)
    )
    metrics = trainer.evaluate(["coco"])["coco"]
    assert metrics.keys() == {"0shot_cider", "0shot_exact_match", "1shot_cider", "1shot_exact_match"}
    assert len(scored) == 2 and len(scored[0]) == 5  # every image once, with both its captions
    assert scored[0][3] == [paths[3].with_suffix(".txt").read_text(), "picture 3"]
