"""What a run records about itself: flattened config params, code version, and the Ray job it ran in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{'model': {'encoder': 'tiny'}}`` → ``{'model.encoder': 'tiny'}``; lists become JSON text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = str(value)
    return out


def git_commit(folder: str | Path | None = None) -> dict[str, str]:
    """``{'git_commit': sha, 'git_dirty': 'true'|'false'}`` for the code's checkout; {} outside git."""
    folder = Path(folder or Path(__file__).parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5)
        return {"git_commit": sha.stdout.strip(), "git_dirty": str(bool(dirty.stdout.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


def ray_tags(run_name: str) -> dict[str, str]:
    """``ray.run_name`` / ``ray.job_id`` (/ ``ray.submission_id``) when this process runs under Ray, else {}.

    Never imports Ray: it is asked only when the process already uses it.
    """
    job_id = os.environ.get("RAY_JOB_ID", "")
    if not job_id and "ray" in sys.modules:
        try:
            import ray

            if ray.is_initialized():
                job_id = ray.get_runtime_context().get_job_id() or ""
        except Exception:  # noqa: BLE001 - metadata only, never fail a run for it
            job_id = ""
    if not job_id:
        return {}
    tags = {"ray.job_id": job_id, "ray.run_name": run_name}
    submission = os.environ.get("RAY_JOB_SUBMISSION_ID", "")
    if submission:
        tags["ray.submission_id"] = submission
    return tags
