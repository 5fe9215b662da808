"""`vlforge eval`: a finished run's checkpoints evaluated again, without training and without a new run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec

from vlforge import checkpoint as ckpt
from vlforge.cli import main
from vlforge.results import query
from vlforge.results.rundir import RUN_LOCK

ZEROSHOT = ['evaluators.zeroshot.type="zeroshot"', 'evaluators.zeroshot.attribute="color"']


def evals(root: Path, where: str = "true") -> dict[tuple[int, str, str], float]:
    sql = f"SELECT step, evaluator, metric, value FROM evals WHERE {where}"
    rows = json.loads(query(str(root), sql, "json"))
    return {(row["step"], row["evaluator"], row["metric"]): row["value"] for row in rows}


def run_ids(root: Path) -> list[str]:
    return [row["run_id"] for row in json.loads(query(str(root), "SELECT run_id FROM runs", "json"))]


def test_eval_of_a_run_repeats_its_final_numbers_and_adds_earlier_steps(tiny_recipe, runs_root, capsys):
    assert main(["run", str(tiny_recipe), *ZEROSHOT]) == 0
    final = evals(runs_root)
    assert {step for step, _, _ in final} == {6}
    (run_id,) = run_ids(runs_root)
    run_dir = next(runs_root.glob(f"*/{run_id}"))
    chunks = len(list((run_dir / "evals").glob("*.jsonl")))

    assert main(["eval", run_id]) == 0  # the latest checkpoint: step 6, the final evaluation's
    assert "step 6" in capsys.readouterr().out
    assert evals(runs_root) == final  # same numbers (same rows: same step, evaluator and metric)
    assert len(list((run_dir / "evals").glob("*.jsonl"))) == chunks + 2  # one per evaluator
    assert not (run_dir / RUN_LOCK).exists()  # eval adds to the run: it never writes the trainer's lock

    assert main(["eval", run_id, "launch.nproc=2"]) == 0  # two gloo ranks, each its share
    assert evals(runs_root) == final

    (step_3, url), _ = ckpt.list_checkpoints(str(run_dir))
    assert step_3 == 3
    assert main(["eval", url, "--evaluator", "zeroshot"]) == 0
    earlier = evals(runs_root, "step = 3")
    assert {name for _, name, _ in earlier} == {"zeroshot"} and len(earlier) == 4
    assert run_ids(runs_root) == [run_id]  # no training run, no eval-only run: the same run
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and len(status["attempts"]) == 1


def test_eval_of_a_foreign_checkpoint_makes_an_eval_only_run(tiny_recipe, runs_root, tmp_path):
    assert main(["run", str(tiny_recipe), "train.checkpoint_every=0"]) == 0
    (run_id,) = run_ids(runs_root)
    source = Path(fsspec.core.url_to_fs(ckpt.latest_checkpoint(str(next(runs_root.glob(f"*/{run_id}")))))[1])
    foreign = tmp_path / "elsewhere" / source.name  # a file or a folder, as the checkpoint format has it
    foreign.parent.mkdir()
    (shutil.copytree if source.is_dir() else shutil.copy)(source, foreign)

    assert main(["eval", str(foreign), "--recipe", str(tiny_recipe), *ZEROSHOT]) == 0
    (other,) = set(run_ids(runs_root)) - {run_id}
    rows = evals(runs_root, f"run_id = '{other}'")
    assert {name for _, name, _ in rows} == {"retrieval", "zeroshot"} and {s for s, _, _ in rows} == {6}
    assert (
        rows[(6, "retrieval", "i2t_r1")]
        == evals(runs_root, f"run_id = '{run_id}'")[(6, "retrieval", "i2t_r1")]
    )
    config = json.loads(query(str(runs_root), f"SELECT status FROM runs WHERE run_id = '{other}'", "json"))
    assert config == [{"status": "completed"}]


def test_eval_errors_are_clear(tiny_recipe, runs_root, tmp_path, capsys):
    assert main(["run", str(tiny_recipe), "train.checkpoint_every=0"]) == 0
    (run_id,) = run_ids(runs_root)
    assert main(["eval", run_id, "--evaluator", "nope"]) == 2
    assert "--evaluator nope: not in the recipe (evaluators: retrieval)" in capsys.readouterr().err
    lone = tmp_path / "lone.pt"
    lone.write_bytes(b"")
    assert main(["eval", str(lone)]) == 2
    assert "is not inside a run: give --recipe" in capsys.readouterr().err
    assert main(["eval", "no-such-run"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err


def test_the_final_checkpoint_is_written_before_a_failing_final_evaluation(
    tiny_recipe, runs_root, tmp_path, capsys
):
    names = tmp_path / "two_colours.txt"
    names.write_text("red\ngreen\n")  # 8 colours in the data: the evaluator fails after training
    failing = [*ZEROSHOT, f'evaluators.zeroshot.class_names="{names}"', "train.checkpoint_every=0"]
    assert main(["run", str(tiny_recipe), *failing]) != 0
    assert "only 2 class names" in capsys.readouterr().err
    (run_dir,) = runs_root.glob("*/*/status.json")
    assert [step for step, _ in ckpt.list_checkpoints(str(run_dir.parent))] == [6]
    assert json.loads(run_dir.read_text())["status"] == "failed"
