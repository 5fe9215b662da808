"""VQAv2-style few-shot on real files: the soft accuracy, the file formats, the evaluator end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image
from vlforge_plugins.flamingo import fewshot
from vlforge_plugins.flamingo.metrics import normalize_vqa_answer, vqa_accuracy, vqa_answer_of

from vlforge.cli import main
from vlforge.data import VQAConfig
from vlforge.data.vqa import VQASource
from vlforge.engine import Trainer
from vlforge.errors import UserError
from vlforge.recipe import RecipeError, load_recipe

TINY = Path(__file__).resolve().parents[3] / "recipes" / "flamingo_tiny.toml"
SMALL = ["train.batch_size=8", "train.progress=false", "train.steps=1", "data.sources.interleaved.size=64"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def write_vqa_split(folder: Path, name: str = "val") -> Path:
    """A JSONL split of 4 questions on 4 real JPEGs (one solid colour each) and one bad line."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (colour, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (40, 40), rgb).save(folder / "images" / f"{colour}.jpg", quality=95)
        answers = [colour] * 7 + ["orange"] * 2 + ["A " + colour.title() + "!"]
        record = {"image": f"images/{colour}.jpg", "question": "What color is it?", "answers": answers}
        lines.append(json.dumps({**record, "question_id": 100 + index, "image_id": index}))
    lines.insert(2, '{"image": "images/red.jpg", "question": "no answers"}')
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_vqa_soft_accuracy_equals_hand_computed_values():
    # Normalisation: punctuation, lowercase, number words, articles, contractions.
    assert normalize_vqa_answer("The Two dogs!") == "2 dogs"
    assert normalize_vqa_answer("an apple.") == "apple"
    assert normalize_vqa_answer("dont know") == "don't know"
    assert normalize_vqa_answer("1,000") == "1000" and normalize_vqa_answer("3.5") == "3.5"
    assert normalize_vqa_answer("black/white") == "black white"  # a mark between words: a space
    assert normalize_vqa_answer("it's 10:30 a.m.") == "it's 10:30 am"  # ':' and "'" are kept
    # 3 of 10 said "2", 7 said "3": leaving out a "2" leaves 2 matches (2/3), out of the rest 3 (1).
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.3 * 2 / 3 + 0.7)
    assert vqa_accuracy("3", ["2"] * 3 + ["3"] * 7) == 1.0
    # 1 of 10: left out it scores 0, otherwise 1/3; (9 × 1/3) / 10.
    assert vqa_accuracy("the cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("bird", ["cat"] + ["dog"] * 9) == 0.0
    # All ten agree: the official evaluation compares without normalising.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0 and vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    # OpenFlamingo's cut of a generation.
    assert vqa_answer_of(" red, blue Question:what") == "red"
    assert vqa_answer_of("two Short answer:3") == "two"


def test_vqa_files_jsonl_with_bad_lines_and_the_official_pair(tmp_path, caplog):
    jsonl = write_vqa_split(tmp_path)
    questions = {
        "data_subtype": "val2014",
        "questions": [{"question_id": 7, "image_id": 42, "question": "Why?"}],
    }
    annotations = {"annotations": [{"question_id": 7, "answers": [{"answer": "because"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    config = VQAConfig(
        splits={"val": str(jsonl), "official": [str(tmp_path / "a.json"), str(tmp_path / "q.json")]},
        image_root=str(tmp_path),
    )
    source = VQASource(config, pipeline=lambda data: data)  # the pipeline is not under test here
    val = source.dataset("val")
    assert len(val) == 4 and source.skipped("val") == 1
    assert "val.jsonl:line 3: 'answers' is not a list of text" in caplog.text
    assert val.raws[1].key == "101" and val.raws[1].image_id == "1" and val.raws[1].answers[-1] == "A Green!"
    (official,) = source.dataset("official").raws
    assert official.image_url == f"{tmp_path}/val2014/COCO_val2014_000000000042.jpg"
    assert official.answers == ("because",) * 10 and official.question == "Why?"
    with pytest.raises(UserError, match=rf"data.splits.val: no VQA file '{tmp_path}/missing.jsonl'"):
        VQASource(VQAConfig(splits={"val": str(tmp_path / "missing.jsonl")}), pipeline=None)


def vqa_table(path: Path, *extra: str) -> list[str]:
    return [
        'evaluators.vqav2.type="flamingo.fewshot"',
        'evaluators.vqav2.task="vqa"',
        'evaluators.vqav2.source="data"',
        "evaluators.vqav2.shots=[0, 2]",
        "evaluators.vqav2.num_queries=100",  # more than the file holds: all 4 questions
        "evaluators.vqav2.max_new_tokens=3",
        'evaluators.vqav2.data.type="vqa"',
        f'evaluators.vqav2.data.splits={{val = "{path}", train = "{path}"}}',
        *extra,
    ]


def test_fewshot_vqa_on_a_vqa_file_scores_every_question_against_its_answers(tmp_path, monkeypatch):
    recipe, plugins = load_recipe(TINY, [*SMALL, *vqa_table(write_vqa_split(tmp_path))])
    trainer = Trainer(recipe, plugins, str(tmp_path / "run"))
    prompts, scored = [], []
    generate, score = fewshot.FewShotEvaluator.generate, fewshot.FewShotEvaluator.score
    monkeypatch.setattr(
        fewshot.FewShotEvaluator,
        "generate",
        lambda self, m, p, d: prompts.append(p) or generate(self, m, p, d),
    )
    monkeypatch.setattr(
        fewshot.FewShotEvaluator, "score", lambda self, k, p, r: scored.append(r) or score(self, k, p, r)
    )
    metrics = trainer.evaluate(["vqav2"])["vqav2"]
    assert metrics.keys() == {"0shot_vqa_accuracy", "2shot_vqa_accuracy", "skipped_lines"}
    assert all(math.isfinite(value) and 0 <= value <= 100 for value in metrics.values())
    assert metrics["skipped_lines"] == 1
    assert len(scored) == 2 and len(scored[0]) == 4 and scored[0][2][:7] == ["blue"] * 7
    text, images = prompts[1][0]  # 2 shots: two examples with images, then the query
    assert text.count("<image>") == 3 and images.shape[0] == 3
    assert text.endswith("<image>Question:What color is it? Short answer:")
    assert "Short answer:red<|endofchunk|>" in text or "Short answer:green<|endofchunk|>" in text
    zero_shot_text, zero_shot_images = prompts[0][0]
    assert zero_shot_text.count("<image>") == 1 and zero_shot_images.shape[0] == 1  # text-only examples


def test_vqa_evaluator_data_is_checked_before_training(tmp_path, monkeypatch, capsys):
    path = write_vqa_split(tmp_path)
    monkeypatch.setenv("VLFORGE_RUNS", str(tmp_path / "runs"))
    missing = vqa_table(path)[:-1] + [
        f'evaluators.vqav2.data.splits={{val = "{path}", train = "/nope/t.jsonl"}}'
    ]
    assert main(["run", str(TINY), *SMALL, *missing]) == 2  # when the run builds, before any step
    assert "error: data.splits.train: no VQA file '/nope/t.jsonl'" in capsys.readouterr().err
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, [*SMALL, *vqa_table(path, 'evaluators.vqav2.support_split="test"')])
    found = {problem.key: problem.message for problem in info.value.problems}
    assert "has no split 'test' (splits: val, train)" in found["evaluators.vqav2.support_split"]
    caption_data = [
        'evaluators.vqav2.data={type="captions", files="x.jsonl"}',
    ]
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, [*SMALL, *vqa_table(path)[:-2], *caption_data, 'evaluators.vqav2.split="val"'])
    found = {problem.key: problem.message for problem in info.value.problems}
    assert "task 'vqa' on data needs a 'vqa' dataset" in found["evaluators.vqav2.data.type"]
