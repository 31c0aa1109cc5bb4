"""Spot-ready training on a loopback two-node Ray cluster of its own (a head and a worker node, own ports,
own process group): an elastic run loses its worker node and finishes on one worker, then grows back;
a preemption notice produces a checkpoint at once; validation metrics arrive while training goes on.

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

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
BYOL_RAY = Path(sys.executable).with_name("byol-ray")


class SpotCluster:
    """Drives tests/spot_cluster.py: its nodes can be killed and added while a run goes on."""

    def __init__(self, temp_dir: Path, log: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "spot_cluster.py"), "--temp-dir", str(temp_dir)],
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


@pytest.fixture
def spot_cluster(tmp_path_factory):
    temp = Path(f"/tmp/rs-{os.getpid()}-{time.monotonic_ns() % 10**6}")  # Ray's socket paths must stay short
    cluster = SpotCluster(temp, tmp_path_factory.mktemp("spot") / "cluster.log")
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(temp, ignore_errors=True)


def _start_run(cluster: SpotCluster, tmp: Path, name: str, cifar_small, mlflow_server: str, *extra: str):
    train, val = cifar_small
    cmd = [str(BYOL_RAY), "train", "--config", "demo",
           f"data.train={train}", f"data.val={val}", "data.loader=torch", "data.num_workers=1",
           "model.projector_hidden_dim=128", "model.predictor_hidden_dim=128", "model.projector_dim=64",
           "train.batch_size=64", "train.log_every_steps=1", "train.checkpoint_every_steps=3",
           "ray.num_workers=2", "ray.min_workers=1", "ray.max_failures=5", "ray.cpus_per_worker=2", "ray.resize_check_s=5",
           "ray.num_to_keep=100", "eval.cpus=1", "mlflow.system_metrics_every_s=0",
           f"mlflow.tracking_uri={mlflow_server}", f"mlflow.experiment=spot-{name}", f"mlflow.register_name=spot-{name}",
           f"ray.address={cluster.address}", f"output_dir={tmp}/runs", f"data.cache_dir={tmp}/cache",
           f"run_name={name}", *extra]
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


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


def test_preemption_notice_checkpoints_at_once_and_the_run_finishes(spot_cluster, tmp_path, cifar_small,
                                                                    mlflow_server):
    proc, log = _start_run(spot_cluster, tmp_path, "spot", cifar_small, mlflow_server, "train.epochs=5",
                           "train.checkpoint_every_steps=0", "ray.preemption_poll_steps=1", "data.val=")
    _wait("an epoch on two workers", lambda: any(r["world_size"] == 2 for r in _history(tmp_path, "spot")), proc, log)
    subprocess.run([str(Path(sys.executable).with_name("ray")), "drain-node", "--address", spot_cluster.address,
                    "--node-id", spot_cluster.node, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds", "20"],
                   check=True, capture_output=True)
    client, run_id = _mlflow_run(mlflow_server, tmp_path, "spot")
    step = int(_wait("the preemption notice in MLflow", lambda: client.get_run(run_id).data.tags.get(
        "preemption.last_notice_step"), proc, log, timeout=60))
    # its checkpoint: mid-epoch, or the epoch end's when the notice came at an epoch's last step
    name = f"epoch_{step // 9:04d}" if step % 9 == 0 else f"epoch_{step // 9:04d}-step_{step:08d}"
    checkpoint = tmp_path / "runs" / "spot" / "checkpoints" / name / "state.pt"
    _wait(f"the checkpoint {name}", checkpoint.exists, proc, log, timeout=60)
    spot_cluster.kill(spot_cluster.node)  # the reclaim itself, inside the deadline
    text = _finish(proc, log)

    tags = client.get_run(run_id).data.tags
    assert int(tags["preemption.last_notice_step"]) == step  # the checkpoint is at the step of the notice
    assert json.loads(tags["preemption.last_notice"])["deadline_s"] <= 20
    assert [m.step for m in client.get_metric_history(run_id, "preemption_notice")] == [step]
    # the restarted group (on the remaining node) resumed from that checkpoint: no step before the notice was lost
    restarts = client.get_metric_history(run_id, "restart_step")
    assert restarts and restarts[-1].value == step, [(m.step, m.value) for m in restarts]
    assert client.get_metric_history(run_id, "restart_world_size")[-1].value == 1
    assert "run spot finished" in text
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 5 * 9 + 1))
