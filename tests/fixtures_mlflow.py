"""MLflow fixtures: one real ``mlflow server`` (SQLite backend, artifacts in the object store) per test session."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ports import free_port
from shared_services import shared

_SERVER_START_TIMEOUT_S = 240  # first start creates the schema; ~40 s on 2 cores


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


MLFLOW_ARTIFACTS_BUCKET = "mlflow-artifacts"


def _start_mlflow(s3_server, root: Path) -> tuple[dict, int]:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    s3_server.client().create_bucket(Bucket=MLFLOW_ARTIFACTS_BUCKET)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{MLFLOW_ARTIFACTS_BUCKET}/",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,  # the server's boto3 finds the store
           # MLflow 3's server also starts a job runner and seven huey consumer processes for its own jobs (trace
           # roll-ups, scorers), which nothing here uses: about 25 s of a 2-core machine's CPU at each start
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # Own process group: uvicorn forks workers; stopping the group stops exactly what was started here.
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
    while not _healthy(uri):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"mlflow server did not become healthy (exit code {proc.poll()}):\n"
                               f"{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    return {"uri": uri}, proc.pid


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server) -> str:
    """``mlflow server`` on 127.0.0.1 and a free port, one per test session (shared by its xdist workers; the
    session's root process stops it at the end: tests/shared_services.py); returns its http URI.

    As on a cluster without a shared disk, it serves (proxies) artifacts kept in the session's object store
    (``--artifacts-destination s3://mlflow-artifacts/``): every registered encoder, plot and config of the
    tests lives in that bucket, and clients reach it only through the server.
    """
    return shared(tmp_path_factory, "mlflow", functools.partial(_start_mlflow, s3_server))["uri"]


@pytest.fixture
def sqlite_store(tmp_path) -> str:
    """A fresh local SQLite tracking store (MLflow 3.17's default kind), absolute."""
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
