"""Connecting to Ray: the embedded default (a private in-process local Ray) or a cluster, and how loud Ray is.

Shared by every command that runs on Ray (``train``, ``tune``, ``embed``, ``serve``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal

from byol_ray.progress import say, verbose


# What a driver prints of its workers' output (Ray's log forwarding) skips the lines this regex matches: Ray's own
# knob, read once when Ray is imported. Ray's log files keep every line.
SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"
# Lines that Ray prints on every successful run although nothing is wrong, each with why; `--verbose` shows them.
# Only these exact messages: an error line of any other kind, or this one about another actor, still shows.
BENIGN_RAY_LINES = (
    # Ray Train V2's controller starts its PreemptionWatcher actor (ray.train.v2...callbacks.preemption_callback)
    # with max_restarts=-1 and the training workers' actor handles as constructor arguments. Ray Core logs an E line
    # (core_worker.cc, once per process) for any restartable actor whose arguments hold references: a restart would
    # fail if those were lost (ray-project/ray#53727). Here they are the live workers' handles, and a new worker
    # group gets a new watcher: nothing for anyone to do.
    r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' and ID: '[0-9a-f]+' has constructor arguments "
    r"in the object store and max_restarts > 0\.",
)


def quiet_ray_console() -> None:
    """Unless ``--verbose``: the driver's console skips :data:`BENIGN_RAY_LINES` (a user's own skip regex stays;
    with ``--verbose``, one inherited from a quiet ``byol-ray`` is taken out again).

    Takes effect for a Ray imported after it (the CLI calls it first thing; :func:`init_ray` again, for callers
    from Python). Repeated calls add nothing.
    """
    ours = "|".join(f"(?:{line})" for line in BENIGN_RAY_LINES)
    own = [part for part in os.environ.get(SKIP_ENV, "").split(f"|{ours}") if part and part != ours]
    value = "|".join(own if verbose() else [*own, ours])
    if value:
        os.environ[SKIP_ENV] = value
    else:
        os.environ.pop(SKIP_ENV, None)


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
    quiet_ray_console()  # before Ray is imported: Ray reads it then
    if not address:
        for key, value in LOCAL_RAY_ENV.items():  # before Ray is imported too (the loopback choice is read then)
            os.environ.setdefault(key, value)  # a user's own setting wins
    import ray

    if ray.is_initialized():
        return
    global _embedded
    _embedded = not address
    if address:
        context = _init(ray, address)
    else:
        with _one_local_start_at_a_time(), _ctrl_c_for_this_process_only():
            context = _init(ray, address)
    where = (f"the cluster at {address}" if address else
             f"an in-process local Ray of its own on {ray.util.get_node_ip_address()} "
             "(set ray.address=HOST:PORT or RAY_ADDRESS to use a cluster)")
    say(f"Ray: {where}; dashboard {getattr(context, 'dashboard_url', '') or 'off'}")


def _init(ray, address: str):
    """``ray.init``: to the cluster at ``address``, else a new local Ray with the embedded default's options."""
    local = {}
    if not address:
        # Ray's own processes (Train's controller, its placement-group cleaner) find the State API through
        # RAY_API_SERVER_ADDRESS, else the cluster `ray start` last recorded on the machine: a stale record
        # made the cleaner hang and print a traceback at the end of a successful run. Pin this cluster's
        # dashboard (8265 when free) and tell them; Ray's processes inherit this environment.
        port = _free_port(8265)
        local = {"dashboard_port": port,
                 "runtime_env": {"worker_process_setup_hook": f"{__name__}.{restore_sigint.__name__}"}}
        os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
        if not verbose():
            # Ray 2.60 turns token authentication on for a new local Ray unless RAY_AUTH_MODE says otherwise, and
            # says so in a WARNING at every start; this one is private to the process and bound to loopback
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    return ray.init(address=address or "local", log_to_driver=True,
                    logging_level=logging.INFO if verbose() else logging.WARNING, **local)


_children_ignore_sigint = False  # set while the local Ray starts its processes


def _after_fork_in_child() -> None:
    if _children_ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # SIG_IGN survives exec; Python then leaves it ignored


os.register_at_fork(after_in_child=_after_fork_in_child)


def restore_sigint() -> None:
    """The local Ray's ``worker_process_setup_hook``: Python's own SIGINT handler again in each worker process.

    The raylet passes the ignored SIGINT it was started with on to the workers it starts, and Ray's ``ray.cancel``
    interrupts a running task through that handler (``_thread.interrupt_main``, a no-op while SIGINT is ignored).
    A terminal's Ctrl-C still does not reach them: each worker has a process group of its own and SIGINT blocked."""
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _ctrl_c_for_this_process_only():
    """The processes the local Ray starts meanwhile ignore SIGINT (they inherit it); this process keeps its handler.

    A terminal's Ctrl-C goes to its whole foreground process group, and the local Ray's dashboard and its State
    API processes are in it and stop on SIGINT. Ray Train's abort then waited for its placement-group cleaner,
    which queries that State API, until its timeout: the workers trained on for 8 s after Ctrl-C and wrote
    checkpoints that Ray Train no longer recorded (Ray 2.60; docs/design.md, "Facts about the tools").

    Only the children change: Ray starts each process with a ``preexec_fn``, so Python runs its at-fork hooks in
    them. This process's own disposition is left alone: made SIG_IGN process-wide, a Ctrl-C during the start
    would be dropped by whichever of torch's or Ray's threads the kernel handed it to."""
    global _children_ignore_sigint
    _children_ignore_sigint = True
    try:
        yield
    finally:
        _children_ignore_sigint = False


@contextlib.contextmanager
def _one_local_start_at_a_time():
    """A machine-wide lock around choosing the local Ray's dashboard port and starting it (``ray.init`` returns once
    the dashboard listens): two commands started at the same moment both found 8265 free, and the second one's
    dashboard then failed to bind it, printing a traceback and leaving Ray Train without its State API. Without a
    writable /tmp there is no lock, as before. /tmp, not $TMPDIR: ports belong to the machine."""
    import fcntl

    try:
        lock = open("/tmp/byol-ray-local-ray-start.lock", "a")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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
