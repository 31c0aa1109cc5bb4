"""A run's epoch history in ``<run folder>/metrics.jsonl``: readable without MLflow or Ray, complete across restarts."""
from __future__ import annotations

import json
from pathlib import Path

HISTORY_FILE = "metrics.jsonl"


def append_history(folder: Path, metrics: dict[str, float]) -> None:
    """Append one epoch row."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / HISTORY_FILE, "a") as fh:
        fh.write(json.dumps(metrics) + "\n")


def read_history(folder: Path) -> list[dict[str, float]]:
    """All epoch rows of a run, across restarts (the last row wins for a repeated epoch)."""
    path = Path(folder) / HISTORY_FILE
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["epoch"]] = row
    return [rows[k] for k in sorted(rows)]
