"""One real Ray cluster per test session: a head and a second node (separate raylets) on loopback."""
from __future__ import annotations

import os
from unittest import mock

import pytest

from ports import free_port

# Keep every Ray address on 127.0.0.1: without this Ray binds the host's interface address. The
# variable's name is historical; on Linux it only makes Ray pick the loopback IP. Multi-node is
# still possible through ray.cluster_utils.Cluster (the `ray start` CLI refuses a second node then).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _wait_for_the_job_agent(head_node_id: str, timeout_s: float = 120) -> None:
    """`ray job submit` goes to the head node's dashboard agent, which registers itself (in Ray's internal KV) a
    while after the node is up: on a busy 2-core machine later than the 10 s the job server waits for it, and a
    first job then fails with "No available agent to submit job"."""
    import time

    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + timeout_s
    while not _internal_kv_get(f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head_node_id}", namespace=KV_NAMESPACE_DASHBOARD):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the head node's dashboard agent did not register within {timeout_s:.0f} s")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_cluster():
    """Yield ``(cluster, dashboard_url)``; the test process is connected as a driver."""
    import ray
    from ray.cluster_utils import Cluster

    dashboard_port = free_port()
    # Ray's own processes (Ray Train's placement-group cleaner, for one) find the State API through
    # RAY_API_SERVER_ADDRESS, else by looking for a GCS process on the machine, which under pytest-xdist finds
    # several clusters and takes the newest ("Found multiple active Ray instances"). This cluster's processes, and
    # the jobs they start, inherit its own dashboard's address; this process and the commands tests start do not.
    with mock.patch.dict(os.environ, {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}):
        cluster = _start_cluster(Cluster, dashboard_port)
    ray.init(address=cluster.address)
    _wait_for_the_job_agent(cluster.head_node.node_id)
    try:
        yield cluster, f"http://127.0.0.1:{dashboard_port}"
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def two_worker_run(ray_cluster, tmp_path_factory):
    """The reference uninterrupted two-worker run (tests/ray_runs.py, STRAIGHT): ``(cfg, result)``. The Ray Train
    cases read it; the end-to-end case's run, the same recipe with a worker killed, must end with its weights."""
    from byol_ray.ray_train import launch
    from ray_runs import STRAIGHT, run_config

    cfg = run_config(tmp_path_factory.mktemp("straight"), "straight", *STRAIGHT)
    return cfg, launch(cfg)


def _start_cluster(Cluster, dashboard_port: int):
    cluster = Cluster(
        initialize_head=True,
        # the head's dashboard agent, which runs `ray job submit`'s jobs, on a free port too: Ray's fixed default
        # (52365) is taken by any other Ray head on the machine (a second test session, an embedded default), and
        # an agent that cannot bind it stays up without its HTTP service, so every job submission fails
        head_node_args={"num_cpus": 2, "resources": {"head_node": 1}, "include_dashboard": True,
                        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
                        "dashboard_agent_listen_port": free_port()},
    )
    cluster.add_node(num_cpus=2, resources={"second_node": 1})
    cluster.wait_for_nodes()
    return cluster
