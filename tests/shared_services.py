"""Servers that one test session shares across its pytest-xdist worker processes (the object store, MLflow).

Under pytest-xdist (`make test-fast` runs on two workers) a session-scoped fixture runs once per *worker*, so left
alone each worker would start its own MLflow server and object store. Instead, the first worker that needs a
service starts it, in a process group of its own that outlives that worker, and records where it listens; the
other workers read the record. The session's root process (the xdist controller, or the only process of a plain
`pytest` run such as `make test`) stops every recorded service when the session ends, after all workers are done.

The record lives in the session's temporary root: the controller's basetemp, which xdist makes the parent of
every worker's basetemp (``.../pytest-N/popen-gw0``).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def is_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def session_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if is_worker() else base


def shared(tmp_path_factory, name: str, start: Callable[[Path], tuple[dict, int]]) -> dict:
    """The service ``name``'s record, from the first worker that asked for it. ``start(folder)`` starts it (in a
    new session: ``start_new_session=True``) and returns ``(record, process_group_id)``; it runs once per test
    session, under a lock, in whichever worker comes first."""
    root = session_root(tmp_path_factory)
    record = root / f"service-{name}.json"
    with open(root / f"service-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.exists():
            return json.loads(record.read_text())["record"]
        folder = root / f"service-{name}"
        folder.mkdir(exist_ok=True)
        info, pgid = start(folder)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"record": info, "pgid": pgid, "started": time.time()}))
        tmp.replace(record)
        return info


def _alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: a service started by a worker that has
    exited is an orphan, and nothing may reap it here; what is this process's own child is reaped first."""
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def stop_all(tmp_path_factory) -> None:
    """Stop every service this session started (newest first: MLflow before the object store it writes to)."""
    root = session_root(tmp_path_factory)
    records = [json.loads(p.read_text()) for p in root.glob("service-*.json")]
    for rec in sorted(records, key=lambda r: r["started"], reverse=True):
        pgid = rec["pgid"]
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while _alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _alive(pgid):
                break
