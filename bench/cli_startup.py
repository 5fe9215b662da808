"""CLI start-up: wall time of `vlforge --help`, `show`, `validate`, and what they import.

    python bench/cli_startup.py [--repeat 7]

Each command runs in a fresh interpreter; the median wall time is reported
with the heavy modules (torch, timm, transformers, duckdb) it imported, which
must be none, except for `validate`: its resource checks import timm (hence
torch) to check a `timm.vit` model name and pretrained file. Writes
bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from record import record  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "transformers", "duckdb", "submitit")
PROBE = (
    "import sys; from vlforge.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
)
COMMANDS = {
    "python -c pass (interpreter)": [sys.executable, "-c", "pass"],
    "vlforge --help": [sys.executable, "-c", PROBE, "--help"],
    "vlforge show quickstart": [sys.executable, "-c", PROBE, "show", str(REPO / "recipes/quickstart.toml")],
    "vlforge validate quickstart": [
        sys.executable,
        "-c",
        PROBE,
        "validate",
        str(REPO / "recipes/quickstart.toml"),
    ],
    "vlforge plugins": [sys.executable, "-c", PROBE, "plugins"],
}


def measure(cmd: list[str], repeat: int) -> tuple[float, str]:
    times, heavy = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        times.append(time.perf_counter() - start)
        heavy = next((line[6:] for line in out.splitlines() if line.startswith("HEAVY=")), "")
    return statistics.median(times), heavy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rows = {}
    for name, cmd in COMMANDS.items():
        seconds, heavy = measure(cmd, args.repeat)
        rows[name] = {"median_s": round(seconds, 4), "heavy_imports": heavy.split(",") if heavy else []}
        print(f"{name:32s} {seconds * 1000:7.0f} ms   heavy imports: {heavy or 'none'}")
    record("cli_startup", {"repeat": args.repeat, "commands": rows})


if __name__ == "__main__":
    main()
