"""What every benchmark prints and keeps beside its timings: the load average around the run
and a timestamped JSON file under benchmarks/results/ (git-ignored)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load_line(before: tuple, after: tuple) -> str:
    """``load average (1, 5, 15 min): before (..), after (..); N CPUs``."""
    return (f"load average (1, 5, 15 min): before {tuple(round(v, 1) for v in before)}, "
            f"after {tuple(round(v, 1) for v in after)}; {os.cpu_count()} CPUs")


def save(prefix: str, payload: dict, folder: str | Path = RESULTS) -> Path:
    """Write ``payload`` to ``<folder>/<prefix>_<timestamp>.json`` (default ``results/``), say
    where, return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return path
