"""What `vlforge run <recipe> --dry-run` costs: CPU seconds, peak RSS and wall time per full-scale recipe.

    python bench/plan_cost.py [--recipes flip_vith_laion2b albef_14m flamingo_3b flamingo_9b]

The plan builds each model on meta and traces one step with fake tensors, so it should stay
well under a minute of CPU and a few GB on a laptop whatever the recipe's size (goal: < 20 s
CPU and < 3 GB on the 2-core dev machine). Each plan runs in a fresh interpreter; its children's
rusage is what is reported. Writes bench/results/plan_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from record import record  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
FULL_SCALE = ["flip_vith_laion2b", "albef_14m", "flamingo_3b", "flamingo_9b"]
PROBE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
out = subprocess.run(sys.argv[1:], capture_output=True, text=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr[-2000:],
                  "wall_s": time.perf_counter() - start,
                  "cpu_s": usage.ru_utime + usage.ru_stime, "rss_gb": usage.ru_maxrss / 1e6}))
"""


def plan_cost(name: str, runs_root: str) -> dict:
    """One dry run of recipes/<name>.toml in its own process tree: its cost and planned total."""
    command = [
        sys.executable,
        "-m",
        "vlforge.cli",
        "run",
        f"recipes/{name}.toml",
        "--dry-run",
        "--format",
        "json",
        "--runs-root",
        runs_root,
    ]
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, *command], cwd=REPO, capture_output=True, text=True, check=True
    )
    result = json.loads(probe.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{name}: the dry run failed:\n{result['stderr']}")
    plan = json.loads(result["stdout"])
    return {
        "cpu_s": round(result["cpu_s"], 2),
        "rss_gb": round(result["rss_gb"], 3),
        "wall_s": round(result["wall_s"], 2),
        "planned_total_gb": plan["total_gb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="+", default=FULL_SCALE)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as runs_root:
        for name in args.recipes:
            rows[name] = plan_cost(name, runs_root)
            print(
                f"{name:20s} cpu {rows[name]['cpu_s']:6.2f} s  rss {rows[name]['rss_gb']:.2f} GB  "
                f"wall {rows[name]['wall_s']:6.2f} s  plan {rows[name]['planned_total_gb']} GB/GPU"
            )
    path = record("plan_cost", {"machine": platform.processor() or platform.machine(), "plans": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
