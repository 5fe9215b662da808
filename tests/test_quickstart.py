"""The README's main job: the quickstart recipe learns (held-out R@1 ≥ 5× chance, both directions)."""

from __future__ import annotations

import json

import pytest

from vlforge.cli import main
from vlforge.results import query

from .conftest import REPO


@pytest.mark.slow
def test_quickstart_retrieval_beats_chance_five_times(runs_root):
    assert main(["run", str(REPO / "recipes" / "quickstart.toml"), "train.progress=false"]) == 0
    rows = json.loads(
        query(
            str(runs_root),
            "SELECT metric, value FROM evals WHERE evaluator = 'retrieval' "
            "AND step = (SELECT max(step) FROM evals)",
            "json",
        )
    )
    metrics = {row["metric"]: row["value"] for row in rows}
    assert metrics["chance_r1"] > 0
    assert metrics["i2t_r1"] >= 5 * metrics["chance_r1"], metrics
    assert metrics["t2i_r1"] >= 5 * metrics["chance_r1"], metrics
