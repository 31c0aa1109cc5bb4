"""Free TCP ports for the servers the tests start (Ray's dashboards and agents, MLflow, the object store)."""
from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1, below the kernel's ephemeral range.

    A port the kernel hands out (a bind to port 0) comes from that range, which every outgoing connection draws
    from too: one could take it before the server meant to listen there binds it. Seen: the session cluster's
    dashboard agent found its port in use, stayed up without its HTTP service, and every test on that cluster
    errored. Below the range only another explicit bind can take a port.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    for _ in range(1000):
        port = random.randrange(10000, ephemeral_low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port on 127.0.0.1 between 10000 and {ephemeral_low}")
