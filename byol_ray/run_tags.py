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


SUBMISSION_ID_ENV = "BYOL_RAY_SUBMISSION_ID"  # the driver's Ray job submission id, handed to its workers
IMAGE_ENV = "BYOL_RAY_IMAGE"  # set in the runtime image (Dockerfile): its tag
IMAGE_COMMIT_ENV = "BYOL_RAY_GIT_COMMIT"  # baked into the image: the commit it was built from
IMAGE_DIRTY_ENV = "BYOL_RAY_GIT_DIRTY"  # baked into the image: 'true' when built from uncommitted changes


def ray_job_submission_id() -> str:
    """The Ray Jobs submission id when this process is a job's entrypoint (or a worker it started), else ''."""
    if os.environ.get(SUBMISSION_ID_ENV):
        return os.environ[SUBMISSION_ID_ENV]
    try:  # Ray's job supervisor hands the entrypoint its job config, metadata included, in this variable
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") or "{}")
    except ValueError:
        return ""
    return str((config.get("metadata") or {}).get("job_submission_id", ""))


def image_dirty() -> str:
    """'true' when the runtime image was built from a tree with uncommitted changes (`make image
    ALLOW_DIRTY=1`), else 'false'. Anything but an explicit true/1/yes reads as clean: the image
    records what `make image` passed, and an image built without the variable predates it."""
    return "true" if os.environ.get(IMAGE_DIRTY_ENV, "").strip().lower() in ("true", "1", "yes") else "false"


def code_version(folder: str | Path | None = None) -> dict[str, str]:
    """The code a run used: the checkout's commit, else the commit baked into the runtime image (and
    whether that image was built from uncommitted changes); and the image's tag when the run is inside one."""
    tags = git_commit(folder)
    if not tags and os.environ.get(IMAGE_COMMIT_ENV):
        tags = {"git_commit": os.environ[IMAGE_COMMIT_ENV], "git_dirty": image_dirty()}
    if os.environ.get(IMAGE_ENV):
        tags["image"] = os.environ[IMAGE_ENV]
    return tags


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
    submission = ray_job_submission_id()
    if submission:
        tags["ray.submission_id"] = submission
    return tags
