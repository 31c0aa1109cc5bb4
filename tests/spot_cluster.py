"""A throwaway Ray cluster on loopback for node-loss tests: a head and worker nodes that can be killed and added.

Run as its own process (and process group), so that killing nodes never touches the test session's own
cluster. It prints one JSON line when the cluster is up, then obeys one command per line on stdin and
answers each with one JSON line:

    add           start another worker node       -> {"added": NODE_ID}
    kill NODE_ID  kill every process of that node -> {"killed": NODE_ID}
    quit          shut the cluster down

    python tests/spot_cluster.py --head-cpus 3 --node-cpus 2 --nodes 1 --temp-dir /tmp/rs-x
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


class SpotCluster:
    """Drives this program from a test or a benchmark: its nodes can be killed and added while a run goes on."""

    def __init__(self, temp_dir: Path, log: Path, nodes: int = 1) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--temp-dir", str(temp_dir),
                                      "--nodes", str(nodes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "wb"),
                                     text=True, start_new_session=True)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-cpus", type=int, default=3)
    parser.add_argument("--node-cpus", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1, help="worker nodes at the start (0: the head only)")
    parser.add_argument("--temp-dir", required=True)
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

    dashboard_port = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": args.head_cpus, "gcs_server_port": _free_port(), "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port, "temp_dir": args.temp_dir, "resources": {"spot_head": 1}})
    nodes = {}

    def add():
        node = cluster.add_node(num_cpus=args.node_cpus, resources={"spot_node": 1})
        nodes[node.node_id] = node  # the hex node id, as `ray drain-node --node-id` takes it
        return node.node_id

    first = [add() for _ in range(args.nodes)][0] if args.nodes else None
    cluster.wait_for_nodes()
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
