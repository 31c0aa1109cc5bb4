"""SIGTERM (`timeout`, `docker stop`, Kubernetes, `ray job stop`) as an exception, so a command can close its
MLflow run KILLED and say how to continue before the process ends."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM (`timeout`, `docker stop`, Kubernetes, `ray job stop`) as ``SystemExit(143)``: the run can flush its
    metrics and close its MLflow run KILLED before the process ends (Python's default is to die on the spot).
    `ray job stop` sends SIGKILL a few seconds later, so what follows must be quick."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
