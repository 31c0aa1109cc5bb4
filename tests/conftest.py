"""Session-wide fixtures: real CIFAR-10 images, one Ray cluster and one MLflow server per session.

Each edge keeps its fixtures in its own module (``fixtures_*.py``), imported here so pytest sees them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throwaway local heads in tests (ENVIRONMENT.md)
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("NUMBA_OPT", "0")  # FFCV pipelines compile ~3x faster; tests use tiny data
# As with an activated virtual environment: `byol-ray` and `ray` on PATH, for this process and for the Ray
# nodes and job entrypoints it starts (the README's commands name them without a path).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"

for _module in ("fixtures_data", "fixtures_mlflow", "fixtures_ray"):
    if (Path(__file__).parent / f"{_module}.py").exists():
        exec(f"from {_module} import *")  # noqa: S102 - re-export fixtures


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR_ARCHIVE} (shared/datasets beside the repo)")
    return CIFAR_ARCHIVE
