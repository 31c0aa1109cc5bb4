"""Spot-ready training on a loopback two-node Ray cluster of its own (a head and a worker node, own ports,
own process group), one for the whole module: an elastic run loses its worker node and finishes on one worker,
then grows back; a preemption notice produces a checkpoint at once; validation metrics arrive while training
goes on. A case that loses its worker node leaves it lost; the next case's fixture adds one again.

Every run here is the CLI a user types (``byol-ray train ... ray.address=...``) against that cluster, with
the session's MLflow server (a file store cannot serve workers on several nodes).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from byol_ray.schedules import learning_rate, target_decay
from fake_metadata import FakeMetadata
from spot_cluster import SpotCluster

pytestmark = pytest.mark.slow

BYOL_RAY = Path(sys.executable).with_name("byol-ray")
# Ray Train's controller polls its workers every 2 s here, its default: the session's conftest shortens that for the
# other tests, but a preemption notice's checkpoint is timing-sensitive (with 0.5 s, the spot-watch case lost the
# notice's checkpoint in 2 of 4 runs: the group was restarted before the notice reached the workers' report). The
# cluster's processes and the runs' drivers (Ray Train hands the variable on to its controller) run without it.
SPOT_ENV = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """One loopback cluster for every case of this module (a head with 3 CPUs, worker nodes of 2 CPUs that the
    cases kill, drain and add); each case gets it as it needs it from the fixtures below."""
    temp = Path(f"/tmp/rs-{os.getpid()}-{time.monotonic_ns() % 10**6}")  # Ray's socket paths must stay short
    cluster = SpotCluster(temp, tmp_path_factory.mktemp("spot") / "cluster.log", nodes=1, coordinator_tick_s=1,
                          env=SPOT_ENV)
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def spot_cluster(shared_cluster):
    """The cluster with a head and one worker node (``.node``): a node an earlier case lost is replaced."""
    shared_cluster.with_workers(1)
    return shared_cluster


@pytest.fixture
def head_only_cluster(shared_cluster):
    """A cluster scaled to zero: the head (3 CPUs) and no worker node yet."""
    shared_cluster.with_workers(0)
    return shared_cluster


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_run_outlives_its_case():
    """A case that fails mid-run leaves no driver behind on the shared cluster for the next case."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


# Each worker reserves 2 CPUs, so that a node holds one worker and the loss of a node is the loss of a worker; torch
# runs on 1 thread in each (ray.torch_threads), as the cluster's nodes share this machine's 2 cores (two workers of
# 2 threads each spun for about twice the CPU time on the same runs).
def _start_run(cluster: SpotCluster, tmp: Path, name: str, cifar_small, mlflow_server: str, *extra: str):
    train, val = cifar_small
    cmd = [str(BYOL_RAY), "train", "--config", "demo",
           f"data.train={train}", f"data.val={val}", "data.loader=torch", "data.num_workers=1",
           "model.projector_hidden_dim=128", "model.predictor_hidden_dim=128", "model.projector_dim=64",
           "train.batch_size=64", "train.log_every_steps=1", "train.checkpoint_every_steps=3",
           "ray.num_workers=2", "ray.min_workers=1", "ray.max_failures=5", "ray.cpus_per_worker=2", "ray.torch_threads=1",
           "ray.resize_check_s=5",
           "ray.num_to_keep=100", "eval.cpus=1", "mlflow.system_metrics_every_s=0",
           f"mlflow.tracking_uri={mlflow_server}", f"mlflow.experiment=spot-{name}", f"mlflow.register_name=spot-{name}",
           f"ray.address={cluster.address}", f"output_dir={tmp}/runs", f"data.cache_dir={tmp}/cache",
           f"run_name={name}", *extra]
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=SPOT_ENV)
    _STARTED.append(proc)
    return proc, log


def _dead_node(cluster: SpotCluster, node_id: str):
    """The node's record once it has left the cluster (None while it is alive)."""
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    for info in GcsClient(address=cluster.address).get_all_node_info(timeout=10).values():
        if info.node_id.hex() == node_id and info.state == GcsNodeInfo.GcsNodeState.DEAD:
            return info
    return None


def _history(tmp: Path, name: str) -> list[dict]:
    path = tmp / "runs" / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(what: str, check, proc, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _finish(proc, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not finish:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _mlflow_run(mlflow_server: str, tmp: Path, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    run_id = (tmp / "runs" / name / "mlflow_run_id").read_text().strip()
    return client, run_id


def test_elastic_run_loses_a_node_finishes_on_one_worker_and_grows_back(spot_cluster, tmp_path, cifar_small,
                                                                         mlflow_server, s3_server):
    # checkpoints in an object store, as on a cluster without a shared disk: each restart reads them from the bucket
    bucket = s3_server.bucket("elastic")
    proc, log = _start_run(spot_cluster, tmp_path, "elastic", cifar_small, mlflow_server, "train.epochs=8",
                           f"ray.storage_path={s3_server.uri(bucket, 'ckpt')}")
    # two workers, one per node (2 CPUs each; the head keeps one CPU for validation)
    _wait("an epoch on two workers", lambda: any(r["world_size"] == 2 for r in _history(tmp_path, "elastic")),
          proc, log)
    spot_cluster.kill(spot_cluster.node)  # the worker node is lost mid-run
    lost_at = len(_history(tmp_path, "elastic"))
    _wait("an epoch on one worker", lambda: any(r["world_size"] == 1 for r in _history(tmp_path, "elastic")[lost_at:]),
          proc, log)
    spot_cluster.add()  # capacity returns: Ray Train 2.60 grows the group back at its next resize check
    text = _finish(proc, log)

    history = _history(tmp_path, "elastic")
    by_epoch = {r["epoch"]: r for r in history}  # a repeated epoch: the last row wins (read_history's rule)
    assert sorted(by_epoch) == list(range(1, 9))
    sizes = [r["world_size"] for r in history]  # every epoch row written, repeated epochs included
    assert sizes[0] == 2 and 1 in sizes, sizes
    assert sizes[-1] == 2, f"the group did not grow back when the node returned: {sizes}"
    # the recipe did not change with the size: global batch, steps, and the schedules at every epoch
    saved = yaml.safe_load((tmp_path / "runs" / "elastic" / "config.yaml").read_text())["derived"]
    assert all(r["global_batch"] == 64 for r in history)
    # 2 CPUs reserved per worker (one worker per node), torch on 1 thread: the nodes share this machine's 2 cores
    assert {r["torch_threads"] for r in history} == {1}
    for epoch, row in by_epoch.items():
        assert row["step"] == epoch * saved["steps_per_epoch"]
        steps = range((epoch - 1) * saved["steps_per_epoch"], epoch * saved["steps_per_epoch"])
        lr = sum(learning_rate(s, peak_lr=saved["peak_lr"], warmup_steps=saved["warmup_steps"],
                               total_steps=saved["total_steps"]) for s in steps) / len(steps)
        tau = sum(target_decay(s, tau_base=0.99, total_steps=saved["total_steps"]) for s in steps) / len(steps)
        assert row["epoch_lr"] == pytest.approx(lr, rel=1e-5) and row["epoch_tau"] == pytest.approx(tau, rel=1e-6)
    assert "run elastic finished" in text
    saved_ckpts = {k.split("/")[3] for k in s3_server.keys(bucket, "ckpt/elastic/checkpoints/") if k.endswith("state.pt")}
    assert {f"epoch_{e:04d}" for e in range(1, 9)} <= saved_ckpts, sorted(saved_ckpts)
    assert f"checkpoints: s3://{bucket}/ckpt/elastic/checkpoints?endpoint_override=" in text

    # one MLflow run, every step logged exactly once, across the restarts
    client, run_id = _mlflow_run(mlflow_server, tmp_path, "elastic")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # every restart is an event of the run: a smaller group after the loss, a larger one after the return
    restarts = sorted(client.get_metric_history(run_id, "restart_world_size"), key=lambda m: m.timestamp)
    assert 1.0 in [m.value for m in restarts] and restarts[-1].value == 2.0, [(m.step, m.value) for m in restarts]
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, saved["total_steps"] + 1)), "duplicate or missing steps"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # validation ran beside training: kNN top-1 of held-out images at epoch ends, some before training ended
    val = client.get_metric_history(run_id, "val_knn_top1")
    assert val and all(0.0 <= m.value <= 1.0 for m in val)
    last_step_time = max(m.timestamp for m in client.get_metric_history(run_id, "loss"))
    assert min(m.timestamp for m in val) < last_step_time, "no validation result arrived during training"
    assert {m.step for m in val} <= {e * saved["steps_per_epoch"] for e in range(1, 9)}


def test_spot_watch_turns_an_ec2_notice_into_a_checkpoint_at_once_and_the_run_finishes(spot_cluster, tmp_path,
                                                                                      cifar_small, mlflow_server):
    """The watcher on the worker node polls a metadata service with EC2's paths and IMDSv2 handshake (on
    loopback); garbage never drains, the interruption notice does, at the notice's deadline."""
    metadata = FakeMetadata()
    watch_log = tmp_path / "spot-watch.log"
    watcher = subprocess.Popen(
        [str(BYOL_RAY), "spot-watch", "--cloud", "aws", "--metadata-url", metadata.url, "--address",
         spot_cluster.address, "--node-id", spot_cluster.node, "--poll-s", "0.2", "--json"],
        stdout=subprocess.PIPE, stderr=open(watch_log, "wb"), text=True, start_new_session=True)
    try:
        # garbage first: a malformed notice, then a failing service; one log line each, and nothing drains
        # (the run below gets a worker on that node)
        def logged(text: str, count: int = 1):
            deadline = time.monotonic() + 120  # a wait, not a speed limit: the machine may be running other tests
            while watch_log.read_text().count(text) < count:
                assert watcher.poll() is None and time.monotonic() < deadline, watch_log.read_text()
                time.sleep(0.2)

        metadata.instance_action = '{"action": "terminate", "time": "soon"}'
        logged("malformed spot/instance-action")
        metadata.instance_action = None
        logged("metadata readable again")
        metadata.status = 500
        logged("HTTP 500")
        metadata.status = None
        logged("metadata readable again", 2)
        polls = metadata.gets("/latest/meta-data/spot/instance-action")
        time.sleep(2)
        assert metadata.gets("/latest/meta-data/spot/instance-action") >= polls + 3  # still polling (every 0.2 s)
        lines = watch_log.read_text().splitlines()
        assert sum("malformed" in line for line in lines) == 1 and sum("HTTP 500" in line for line in lines) == 1
        # long enough to outlast the notice's deadline (20 s): the drained node's worker trains on until then, and
        # Ray Train restarts the group without it at the deadline (a run that ended first would never restart)
        proc, log = _start_run(spot_cluster, tmp_path, "spot", cifar_small, mlflow_server, "train.epochs=12",
                               "train.checkpoint_every_steps=0", "ray.preemption_poll_steps=1", "data.val=")
        _wait("an epoch on two workers", lambda: any(r["world_size"] == 2 for r in _history(tmp_path, "spot")),
              proc, log)
        assert watcher.poll() is None, watch_log.read_text()
        # the notice: EC2 gives the time the instance goes, two minutes out there, 20 s here
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 20))
        metadata.instance_action = json.dumps({"action": "terminate", "time": stamp})
        drained = json.loads(watcher.communicate(timeout=30)[0])
        assert watcher.returncode == 0 and drained["node_id"] == spot_cluster.node
        assert 10 <= drained["deadline_s"] <= 20  # the notice's time, not a default
        assert f"terminate at {stamp}: drained Ray node {spot_cluster.node[:12]}" in watch_log.read_text()

        client, run_id = _mlflow_run(mlflow_server, tmp_path, "spot")
        step = int(_wait("the preemption notice in MLflow", lambda: client.get_run(run_id).data.tags.get(
            "preemption.last_notice_step"), proc, log, timeout=120))
        # its checkpoint: mid-epoch, or the epoch end's when the notice came at an epoch's last step
        name = f"epoch_{step // 9:04d}" if step % 9 == 0 else f"epoch_{step // 9:04d}-step_{step:08d}"
        checkpoint = tmp_path / "runs" / "spot" / "checkpoints" / name / "state.pt"
        _wait(f"the checkpoint {name}", checkpoint.exists, proc, log, timeout=120)
        committed = float(_wait("the checkpoint's commit in MLflow", lambda: client.get_run(run_id).data.tags.get(
            "preemption.last_committed_at"), proc, log, timeout=120))
        # Ray Train restarts the group without the draining node; the node, idle then, leaves the cluster
        # before the cloud's deadline, and Ray keeps the cloud's words as the reason
        gone = _wait("the drained node to leave", lambda: _dead_node(spot_cluster, spot_cluster.node), proc, log,
                     timeout=120)
        text = _finish(proc, log)
    finally:
        metadata.close()
        if watcher.poll() is None:
            os.killpg(watcher.pid, signal.SIGKILL)

    tags = client.get_run(run_id).data.tags
    assert int(tags["preemption.last_notice_step"]) == step  # the checkpoint is at the step of the notice
    assert json.loads(tags["preemption.last_notice"])["deadline_s"] <= 20
    assert gone.death_info.reason == gone.death_info.AUTOSCALER_DRAIN_PREEMPTED
    assert f"aws spot instance-action: terminate at {stamp}" in gone.death_info.reason_message  # the cloud's words
    # committed inside the deadline the cloud gave
    assert drained["drained_at"] < committed < drained["drained_at"] + drained["deadline_s"]
    assert [m.step for m in client.get_metric_history(run_id, "preemption_notice")] == [step]
    # the restarted group (on the remaining node) resumed from that checkpoint, or from a later one when the
    # group went on training until Ray Train restarted it: no step before the notice was lost
    restarts = client.get_metric_history(run_id, "restart_step")
    assert restarts and restarts[-1].value >= step, [(m.step, m.value) for m in restarts]
    assert client.get_metric_history(run_id, "restart_world_size")[-1].value == 1
    assert "run spot finished" in text
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 12 * 9 + 1))


def test_drain_now_is_a_prestop_hook_the_node_leaves_before_the_deadline(spot_cluster, tmp_path):
    """A KubeRay worker pod's preStop: the node is drained now (reason PREEMPTION) and the hook returns once
    the node has left the cluster, well inside the deadline."""
    result = subprocess.run([str(BYOL_RAY), "spot-watch", "--drain-now", "--deadline-s", "30", "--reason",
                             "pod stopping (test)", "--address", spot_cluster.address, "--node-id", spot_cluster.node,
                             "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["left"] is True and answer["waited_s"] < 30
    gone = _dead_node(spot_cluster, spot_cluster.node)
    assert gone.death_info.reason == gone.death_info.AUTOSCALER_DRAIN_PREEMPTED
    assert "pod stopping (test)" in gone.death_info.reason_message


def test_a_run_waits_for_its_workers_until_a_node_joins(head_only_cluster, tmp_path, cifar_small, mlflow_server):
    """Scale to zero: the group (2 workers x 2 CPUs and 1 CPU for validation) does not fit the head alone; the run
    says so, waits with progress lines instead of refusing, and starts once a node has joined."""
    proc, log = _start_run(head_only_cluster, tmp_path, "grow", cifar_small, mlflow_server, "train.epochs=1",
                           "ray.min_workers=0", "ray.wait_for_workers_s=240")
    _wait("the waiting line", lambda: "for the cluster to grow" in log.read_text(), proc, log, timeout=120)
    assert not (tmp_path / "runs" / "grow").exists()  # nothing is written while it waits
    # one progress line (every 15 s)
    _wait("a progress line", lambda: "still waiting for capacity: the cluster has 3 CPU" in log.read_text(), proc, log,
          timeout=60)
    head_only_cluster.add()
    text = _finish(proc, log)
    assert "the cluster has room for the workers after" in text
    assert [r["world_size"] for r in _history(tmp_path, "grow")] == [2]
    assert "run grow finished" in text
