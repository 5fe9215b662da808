"""Where every benchmark records its figures: ``bench/results/<name>.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, result: Any) -> Path:
    """Write ``result`` as ``bench/results/<name>.json`` (indented, one trailing newline)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
