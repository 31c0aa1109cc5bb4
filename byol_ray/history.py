"""A run's epoch history in ``<run folder>/metrics.jsonl``: readable without MLflow or Ray, complete across restarts.

The run folder may be in an object store (``output_dir=s3://...``); :mod:`byol_ray.storage` reads and writes it.
"""
from __future__ import annotations

import json
from pathlib import Path

from byol_ray.storage import Location, location

HISTORY_FILE = "metrics.jsonl"


def append_history(folder: str | Path | Location, metrics: dict[str, float]) -> None:
    """Append one epoch row."""
    (location(folder) / HISTORY_FILE).append_line(json.dumps(metrics))


def read_history(folder: str | Path | Location) -> list[dict[str, float]]:
    """All epoch rows of a run, across restarts (the last row wins for a repeated epoch)."""
    path = location(folder) / HISTORY_FILE
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["epoch"]] = row
    return [rows[k] for k in sorted(rows)]
