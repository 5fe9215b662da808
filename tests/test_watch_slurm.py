"""`vlforge run --launcher slurm --follow` on the real local Slurm cluster (one short job)."""

from __future__ import annotations

import pytest

from vlforge.cli import main
from vlforge.launch.slurm import read_submissions

from .test_slurm import cluster, write_recipe  # noqa: F401  (cluster: skips without a cluster)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_follow_shows_the_jobs_log_until_its_run_ends(tmp_path, capsys):
    root = tmp_path / "runs"
    recipe = write_recipe(tmp_path, "followed")
    args = ["run", str(recipe), "--launcher", "slurm", 'launch.profile="dev"', "--follow"]
    assert main([*args, "--runs-root", str(root)]) == 0
    out = capsys.readouterr().out
    [record] = read_submissions(str(root))
    assert f"submitted as Slurm job {record.job_id}" in out
    assert "attempt started" in out and "step 6/6 loss=" in out
    assert out.rstrip().endswith(f"vlforge: run {record.run_id} completed")
