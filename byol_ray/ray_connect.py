"""Connecting to Ray: the embedded default (a private in-process local Ray) or a cluster, and how loud Ray is.

Shared by every command that runs on Ray (``train``, ``tune``, ``embed``, ``serve``).
"""
from __future__ import annotations
from byol_ray.progress import say

import logging
import os

VERBOSE_ENV = "BYOL_RAY_VERBOSE"  # set by `byol-ray --verbose`: Ray's and Tune's own progress output comes back


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


# Options of the in-process local Ray (the embedded default), set only when this process starts it.
# The dashboard stays: Ray Train V2's controller and placement-group cleaner query the State API it
# serves (without it, every run logs "Failed to query Ray Train Controller actor state" and stalls).
LOCAL_RAY_ENV = {
    # A private cluster needs no address other machines can reach: bind loopback. (Ray reads this at
    # import; the name is historical, on Linux it only picks 127.0.0.1.)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_enable_metrics_collection": "0",  # no Prometheus export from every process of a laptop run
    "RAY_prestart_worker_first_driver": "0",  # no idle workers polling beside the training worker
}


_embedded = False  # init_ray started this process's own in-process Ray (the embedded default)


def embedded() -> bool:
    """Whether this process runs on the embedded default's in-process Ray (which never grows)."""
    return _embedded


def init_ray(address: str = "") -> None:
    """Connect to ``address`` (``ray.address``, else ``RAY_ADDRESS``, which a Ray job's entrypoint has), else start
    a lean in-process local Ray of this process's own.

    Never Ray's implicit rule (``ray.init()`` without an address joins the cluster that ``ray start`` last
    recorded on the machine, another user's or a dead one): the embedded default is private. Says which it uses.
    """
    address = address or os.environ.get("RAY_ADDRESS", "")
    import ray

    if ray.is_initialized():
        return
    local = {}
    if not address:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)  # a user's own setting wins
        # Ray's own processes (Train's controller, its placement-group cleaner) find the State API through
        # RAY_API_SERVER_ADDRESS, else the cluster `ray start` last recorded on the machine: a stale record
        # made the cleaner hang and print a traceback at the end of a successful run. Pin this cluster's
        # dashboard (8265 when free) and tell them; Ray's processes inherit this environment.
        port = _free_port(8265)
        local = {"dashboard_port": port}
        os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    global _embedded
    _embedded = not address
    context = ray.init(address=address or "local", log_to_driver=True,
                       logging_level=logging.INFO if verbose() else logging.WARNING, **local)
    where = (f"the cluster at {address}" if address else
             "an in-process local Ray of its own (set ray.address=HOST:PORT or RAY_ADDRESS to use a cluster)")
    say(f"Ray: {where}; dashboard {getattr(context, 'dashboard_url', '') or 'off'}")


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it at 127.0.0.1, else a port the kernel says is free."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")
