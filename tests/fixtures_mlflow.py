"""MLflow fixtures: one real ``mlflow server`` (SQLite backend, local artifact root) per test session."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

_SERVER_START_TIMEOUT_S = 240  # first start creates the schema; ~40 s on 2 cores


def _free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """Start ``mlflow server`` on 127.0.0.1 and a free port; yields its http URI; stopped at session end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(root / "server.log", "wb")
    # Own process group: uvicorn forks workers; stopping the group stops exactly what this fixture started.
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
        while not _healthy(uri):
            if proc.poll() is not None:
                log_tail = (root / "server.log").read_text()[-3000:]
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {_SERVER_START_TIMEOUT_S}s:\n"
                                   f"{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.fixture
def sqlite_store(tmp_path) -> str:
    """A fresh local SQLite tracking store (MLflow 3.17's default kind), absolute."""
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
