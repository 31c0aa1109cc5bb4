"""One real Ray cluster per test session: a head and a second node (separate raylets) on loopback."""
from __future__ import annotations

import os
import socket

import pytest

# Keep every Ray address on 127.0.0.1: without this Ray binds the host's interface address. The
# variable's name is historical; on Linux it only makes Ray pick the loopback IP. Multi-node is
# still possible through ray.cluster_utils.Cluster (the `ray start` CLI refuses a second node then).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """Yield ``(cluster, dashboard_url)``; the test process is connected as a driver."""
    import ray
    from ray.cluster_utils import Cluster

    dashboard_port = _free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head_node": 1}, "include_dashboard": True,
                        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port},
    )
    cluster.add_node(num_cpus=2, resources={"second_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster, f"http://127.0.0.1:{dashboard_port}"
    finally:
        ray.shutdown()
        cluster.shutdown()
