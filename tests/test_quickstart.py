"""The README's main job: the quickstart recipe learns visibly.

Held-out R@1 ≥ 5× chance both ways, zero-shot top-1 ≥ 3× chance, and `vlforge eval` of the
finished run's checkpoint gives the final evaluation's numbers again, without a new run.
"""

from __future__ import annotations

import json

import pytest

from vlforge.cli import main
from vlforge.results import query

from .conftest import REPO


@pytest.mark.slow
def final_evals(root) -> dict[tuple[str, str], float]:
    sql = "SELECT evaluator, metric, value FROM evals WHERE step = (SELECT max(step) FROM evals)"
    return {
        (row["evaluator"], row["metric"]): row["value"] for row in json.loads(query(str(root), sql, "json"))
    }


@pytest.mark.slow
def test_quickstart_learns_retrieval_and_zero_shot(runs_root):
    assert main(["run", str(REPO / "recipes" / "quickstart.toml"), "train.progress=false"]) == 0
    metrics = final_evals(runs_root)
    for direction in ("i2t", "t2i"):
        chance = metrics[("retrieval", f"{direction}_chance_r1")]
        assert chance > 0
        assert metrics[("retrieval", f"{direction}_r1")] >= 5 * chance, metrics
    assert metrics[("zeroshot", "top1")] >= 3 * metrics[("zeroshot", "chance_top1")], metrics

    (run_id,) = [
        row["run_id"] for row in json.loads(query(str(runs_root), "SELECT run_id FROM runs", "json"))
    ]
    assert main(["eval", run_id]) == 0
    assert final_evals(runs_root) == pytest.approx(metrics)
    assert json.loads(query(str(runs_root), "SELECT count(*) AS n FROM runs", "json"))[0]["n"] == 1
