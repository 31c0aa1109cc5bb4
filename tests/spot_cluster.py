"""A throwaway Ray cluster on loopback for node-loss tests: a head and worker nodes that can be killed and added.

Run as its own process (and process group), so that killing nodes never touches the test session's own
cluster. It prints one JSON line when the cluster is up, then obeys one command per line on stdin and
answers each with one JSON line:

    add           start another worker node       -> {"added": NODE_ID}
    kill NODE_ID  kill every process of that node -> {"killed": NODE_ID}
    quit          shut the cluster down

Tests share one such cluster across cases (``SpotCluster.with_workers`` sets it up as the next case needs it:
a node that a case killed or drained is replaced, one that it added is kept).

    python tests/spot_cluster.py --head-cpus 3 --node-cpus 2 --nodes 1 --temp-dir /tmp/rs-x
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ports import free_port


class SpotCluster:
    """Drives this program from a test or a benchmark: its nodes can be killed and added while a run goes on."""

    def __init__(self, temp_dir: Path, log: Path, nodes: int = 1, coordinator_tick_s: float = 0,
                 env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--temp-dir", str(temp_dir),
                                      "--nodes", str(nodes), "--coordinator-tick-s", str(coordinator_tick_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "wb"),
                                     text=True, start_new_session=True, env=env)
        info = self._answer()
        self.address, self.dashboard, self.head, self.node = info["address"], info["dashboard"], info["head"], info["node"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the spot cluster helper exited with {self.proc.wait()}")
        return json.loads(line)

    def kill(self, node_id: str) -> None:
        self.proc.stdin.write(f"kill {node_id}\n")
        self.proc.stdin.flush()
        assert self._answer() == {"killed": node_id}

    def add(self) -> str:
        self.proc.stdin.write("add\n")
        self.proc.stdin.flush()
        return self._answer()["added"]

    def alive_workers(self) -> list[str]:
        """The worker nodes (the head left out) that the cluster's GCS counts as alive now."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        infos = GcsClient(address=self.address).get_all_node_info(timeout=10).values()
        return sorted(info.node_id.hex() for info in infos
                      if info.state == GcsNodeInfo.GcsNodeState.ALIVE and info.node_id.hex() != self.head)

    def with_workers(self, count: int, timeout: float = 60) -> None:
        """Leave exactly ``count`` worker nodes alive (kill the extra ones and wait until the cluster has declared
        them dead, so their resources are gone; add the missing ones); ``node`` becomes the first of them."""
        alive = self.alive_workers()
        for node_id in alive[count:]:
            self.kill(node_id)
        deadline = time.monotonic() + timeout
        while len(alive := self.alive_workers()) > count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"killed worker nodes still alive after {timeout} s: {alive}")
            time.sleep(0.2)
        alive += [self.add() for _ in range(count - len(alive))]
        self.node = alive[0] if alive else None

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-g", str(self.proc.pid)], check=False)  # anything left in its group


def _quick_coordinator(address: str, head: str, tick_s: float) -> None:
    """Ray Train sizes an elastic worker group by the nodes that Ray's AutoscalingCoordinator (a detached actor,
    made on first use) last saw, and it looks every 20 s: a lost node still counts, and a node that joined does not
    yet, for up to 20 s (a restart then waits out RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for a group that cannot
    be placed). Made here first, under its name and with its options, the same actor looks every ``tick_s``."""
    import contextlib

    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class QuickCoordinator(_AutoscalingCoordinatorActor):
        TICK_INTERVAL_S = tick_s

    with contextlib.redirect_stdout(sys.stderr):  # stdout is the answer channel
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        try:
            actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(QuickCoordinator).options(
                name="AutoscalingCoordinator", namespace="AutoscalingCoordinator", get_if_exists=True,
                lifetime="detached", scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
            ray.get(actor.__ray_ready__.remote(), timeout=120)
        finally:
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-cpus", type=int, default=3)
    parser.add_argument("--node-cpus", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1, help="worker nodes at the start (0: the head only)")
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--coordinator-tick-s", type=float, default=0,
                        help="how often Ray's AutoscalingCoordinator looks at the nodes (0: Ray's own 20 s)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback addresses only
    # Ray records "the current cluster" under its temp dir; keep that record here, not where the test session's
    # own cluster (or a user's) keeps it
    os.environ["RAY_TMPDIR"] = args.temp_dir
    os.makedirs(os.path.join(args.temp_dir, "ray"), exist_ok=True)
    # A killed node is declared dead after ~3 s instead of ~15 s, and Ray Train gives up on a group that includes
    # its stale resources after 15 s instead of 60 s (the cluster's processes, controller included, inherit these)
    os.environ.setdefault("RAY_health_check_period_ms", "1000")
    os.environ.setdefault("RAY_health_check_failure_threshold", "3")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    from ray.cluster_utils import Cluster

    dashboard_port = free_port()
    # the State API of this cluster, not the newest of the machine's Ray instances (the test session's own clusters
    # run beside it): what Ray Train's placement-group cleaner and controller look up
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": args.head_cpus, "gcs_server_port": free_port(), "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port, "dashboard_agent_listen_port": free_port(),  # not Ray's fixed 52365
        "temp_dir": args.temp_dir, "resources": {"spot_head": 1}})
    nodes = {}

    def add():
        node = cluster.add_node(num_cpus=args.node_cpus, resources={"spot_node": 1})
        nodes[node.node_id] = node  # the hex node id, as `ray drain-node --node-id` takes it
        return node.node_id

    first = [add() for _ in range(args.nodes)][0] if args.nodes else None
    cluster.wait_for_nodes()
    if args.coordinator_tick_s > 0:
        _quick_coordinator(cluster.address, cluster.head_node.node_id, args.coordinator_tick_s)
    print(json.dumps({"address": cluster.address, "dashboard": f"http://127.0.0.1:{dashboard_port}",
                      "head": cluster.head_node.node_id, "node": first}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "add":
            print(json.dumps({"added": add()}), flush=True)
        elif cmd[0] == "kill":
            cluster.remove_node(nodes.pop(cmd[1]), allow_graceful=False)
            print(json.dumps({"killed": cmd[1]}), flush=True)
        elif cmd[0] == "quit":
            break
    cluster.shutdown()


if __name__ == "__main__":
    main()
