"""Ray Train on a real local cluster (head + second node on loopback): DDP, sharding, faults, resume."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from byol_ray.checkpoint import load_checkpoint
from byol_ray.config import ConfigError, load_config
from byol_ray.run_folder import checkpoint_dir, resolve_paths

pytestmark = pytest.mark.slow

TINY = ["model.projector_hidden_dim=128", "model.predictor_hidden_dim=128", "model.projector_dim=64",
        "train.batch_size=64", "train.log_every_steps=10", "train.checkpoint_every_epochs=1",
        "mlflow.enabled=false"]


def _cfg(tmp: Path, name: str, *extra: str):
    return resolve_paths(load_config(["demo"], [
        *TINY, f"run_name={name}", f"output_dir={tmp}/runs", f"ray.storage_path={tmp}/ray",
        f"data.cache_dir={tmp}/cache", *extra,
    ]))


def _history(cfg) -> list[dict]:
    path = Path(cfg.output_dir) / cfg.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _final_state(cfg):
    ckpts = sorted(Path(checkpoint_dir(cfg)).glob("epoch_*/state.pt"))
    assert ckpts, "no checkpoint was written"
    return load_checkpoint(ckpts[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray_train")


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, workdir):
    """The reference uninterrupted 2-worker run (gloo, FFCV shards); other tests compare against it."""
    from byol_ray.ray_train import launch

    # the torch loader here (the FFCV path is covered by the shard and multi-node tests)
    cfg = _cfg(workdir, "straight", "train.epochs=4", "ray.num_workers=2", "data.loader=torch")
    result = launch(cfg)
    return cfg, result


def test_two_worker_cpu_run_completes_and_learns(two_worker_run):
    cfg, result = two_worker_run
    history = _history(cfg)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["epoch_loss"] < history[0]["epoch_loss"] - 0.05
    state = _final_state(cfg)
    assert state["step"] == 4 * (1797 // 64) and state["config"]["derived"]["world_size"] == 2
    assert result.checkpoints == str(checkpoint_dir(cfg)) and result.metrics["epoch"] == 4


def test_epoch_metrics_describe_both_workers_not_rank_0(two_worker_run):
    cfg, _ = two_worker_run
    for row in _history(cfg):
        # each rank saw a different shard, so their losses differ; the reported loss is their
        # sample-weighted mean (equal shards here: the midpoint), not rank 0's value
        low, high = row["epoch_loss_rank_min"], row["epoch_loss_rank_max"]
        assert low < high
        assert row["epoch_loss"] == pytest.approx((low + high) / 2, rel=1e-6)


def _shard_worker(config):
    """Build each rank's loader exactly as train_worker does and record the sample ids it yields."""
    import ray.train
    import ray.train.torch

    from byol_ray.config import from_dict
    from byol_ray.data.loaders import run_loader

    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    loader = run_loader(cfg, config["path"], ray.train.torch.get_device(),
                                rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    loader.set_epoch(0)
    labels = [int(x) for _, _, y in loader for x in y]
    Path(config["out"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps(labels))
    ray.train.report({"n": len(labels)})


def test_each_rank_sees_a_disjoint_half(ray_cluster, workdir, tmp_path):
    """Labels are sample indices in this .beton, so the ids each rank sees are directly comparable."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from PIL import Image

    from byol_ray.config import to_dict
    from byol_ray.data.demo import load_demo
    from byol_ray.data.prepare import prepare

    # one real image per class folder: the label of every sample is its own index
    n = 256
    images, _, _ = load_demo(32)
    folder = tmp_path / "indexed"
    for i in range(n):
        (folder / f"c{i:03d}").mkdir(parents=True)
        Image.fromarray(images[i]).save(folder / f"c{i:03d}" / "img.png")
    beton = tmp_path / "indexed.beton"
    prepare(str(folder), str(beton), progress=False)
    # workers cannot import this test module: ship _shard_worker by value
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = _cfg(workdir, "shards", "ray.num_workers=2", "train.batch_size=32", "model.num_classes=256")
    TorchTrainer(
        _shard_worker, train_loop_config={"cfg": to_dict(cfg), "path": str(beton), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="shards", storage_path=str(tmp_path / "ray")),
    ).fit()
    seen = [set(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]
    assert seen[0].isdisjoint(seen[1])
    assert len(seen[0]) == len(seen[1]) == n // 2  # 128 each = 4 full batches of 32
    assert seen[0] | seen[1] == set(range(n))


def _watch_worker_listeners(done: threading.Event, seen: set[str], before: set[str]) -> None:
    """Every listening TCP address of this run's training workers (this cluster's live ``RayTrainWorker`` actors
    that were not there ``before``; other tests' runs on other clusters of the machine are not this run's),
    polled until ``done``."""
    import psutil
    from ray.util.state import list_actors

    while not done.is_set():
        for actor in list_actors(address=_this_cluster(), limit=10_000,
                                 filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
            if actor.actor_id in before or not actor.pid:
                continue
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(actor.pid)
                seen.update(c.laddr.ip for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
        time.sleep(0.3)


def test_multi_node_run_places_workers_on_both_nodes_and_listens_on_loopback_only(ray_cluster, workdir):
    """The process group's rendezvous store binds the node address (loopback here), not every interface."""
    from ray.util.state import list_actors

    from byol_ray.ray_train import launch

    cfg = _cfg(workdir, "multinode", "train.epochs=1", "ray.num_workers=2", "ray.cpus_per_worker=2")
    def workers():
        return list_actors(address=_this_cluster(), filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)

    before = {a.actor_id for a in workers()}
    done, listening = threading.Event(), set()
    watcher = threading.Thread(target=_watch_worker_listeners, args=(done, listening, before))
    watcher.start()
    try:
        launch(cfg)  # 2 CPUs per worker and 2 CPUs per node: one worker on each node
    finally:
        done.set()
        watcher.join()
    nodes = {a.node_id for a in workers() if a.actor_id not in before}
    assert len(nodes) == 2, f"workers ran on {len(nodes)} node(s)"
    assert _final_state(cfg)["epoch"] == 1
    assert listening, "no listening socket of a training worker was seen"
    everywhere = listening & {"0.0.0.0", "::"}
    assert not everywhere, f"a training worker listened on every interface ({sorted(listening)})"
    assert all(ip.removeprefix("::ffff:") == "127.0.0.1" for ip in listening), sorted(listening)


def _this_cluster() -> str:
    """The GCS address of the cluster this process is connected to: the State API's own discovery would take the
    newest Ray instance on the machine, another test's under pytest-xdist."""
    import ray

    return ray.get_runtime_context().gcs_address


def _kill_a_worker_after_first_checkpoint(cfg, done: threading.Event, killed: list):
    import psutil

    # the checkpoint counts once Ray has registered it in its snapshot, not when its file appears
    snapshot = Path(checkpoint_dir(cfg)) / "checkpoint_manager_snapshot.json"
    while not done.is_set() and not (snapshot.exists() and "epoch_0001" in snapshot.read_text()):
        time.sleep(0.2)
    time.sleep(1.0)  # into epoch 2
    # a worker of this cluster's run, as the cluster lists them: another test's run on another Ray of the machine
    # (pytest-xdist) is not this one's to kill
    from ray.util.state import list_actors

    alive = list_actors(address=_this_cluster(), limit=10_000,
                        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    for actor in alive:
        if actor.pid and not done.is_set():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(actor.pid).kill()
                killed.append(actor.pid)
                return


def launch_killing_a_worker(cfg) -> None:
    """``launch(cfg)`` while a watcher SIGKILLs one training worker after the first checkpoint."""
    from byol_ray.ray_train import launch

    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(cfg, done, killed))
    killer.start()
    try:
        launch(cfg)
    finally:
        done.set()
        killer.join()
    assert killed, "the fault was not injected (run ended before a worker could be killed)"


def test_killed_worker_restarts_from_checkpoint_and_matches_uninterrupted_run(two_worker_run, workdir):
    straight_cfg, _ = two_worker_run
    cfg = _cfg(workdir, "faulty", "train.epochs=4", "ray.num_workers=2", "ray.max_failures=2", "data.loader=torch")
    launch_killing_a_worker(cfg)
    epochs = [h["epoch"] for h in _history(cfg)]
    assert epochs[-1] == 4 and len(epochs) > len(set(epochs)) or epochs == [1, 2, 3, 4]
    faulty, straight = _final_state(cfg), _final_state(straight_cfg)
    assert faulty["step"] == straight["step"] == 4 * (1797 // 64)
    # deterministic resume: identical final weights, so the target was restored as saved
    for part in ("online", "target"):
        for key, value in straight[part].items():
            torch.testing.assert_close(faulty[part][key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=f"{part}.{key}": f"{k}: {m}")


def test_explicit_resume_of_a_finished_run_is_a_no_op_and_a_rerun_is_refused(two_worker_run):
    from byol_ray.ray_train import launch

    cfg, _ = two_worker_run
    with pytest.raises(ConfigError, match="already exists.*--resume straight"):
        launch(cfg)
    # resuming a run whose newest checkpoint is its last epoch retrains nothing, writes nothing and
    # still reports the final epoch (a Tune trial restarted after its last checkpoint needs that result)
    history, state = _history(cfg), _final_state(cfg)
    folder = Path(checkpoint_dir(cfg))
    before = sorted(p.name for p in folder.glob("epoch_*"))
    result = launch(cfg, resume=True)
    assert result.metrics["epoch"] == 4 and result.metrics["epoch_loss"] == history[-1]["epoch_loss"]
    assert _history(cfg) == history
    assert sorted(p.name for p in folder.glob("epoch_*")) == before
    assert _final_state(cfg)["step"] == state["step"]


@pytest.mark.parametrize("override,pattern", [
    ("ray.use_gpu=true", r"asks for 1 GPU worker\(s\) but the cluster has 0 GPU"),
    ("ray.num_workers=8", r"needs 8 CPUs but the cluster has 4; lower ray.num_workers or ray.cpus_per_worker; on a "
                          r"cluster that grows, ray.wait_for_workers_s=SECONDS waits for its nodes"),
    ("data.train=/nonexistent/train.beton", r"data.train='/nonexistent/train.beton' does not exist"),
    ("ray.storage_path=/etc/hostname/ray", r"ray.storage_path='/etc/hostname/ray' is not writable"),
])
def test_bad_input_fails_fast(ray_cluster, workdir, override, pattern):
    from byol_ray.ray_train import launch

    cfg = _cfg(workdir, "bad", "train.batch_size=64", override)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=pattern):
        launch(cfg)
    assert time.monotonic() - start < 10


def test_a_group_that_does_not_fit_waits_only_as_long_as_asked(ray_cluster, workdir):
    """ray.wait_for_workers_s: the run asks for its workers and waits; when the time is up it says what is missing
    and which key to change, and has written nothing."""
    from byol_ray.ray_train import launch

    cfg = _cfg(workdir, "waits", "train.batch_size=64", "ray.num_workers=8", "ray.wait_for_workers_s=3")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"needs 8 CPUs but the cluster has 4 after waiting 3 s "
                                          r"\(ray.wait_for_workers_s\) for the cluster to grow"):
        launch(cfg)
    assert 3 <= time.monotonic() - start < 15
    assert not (Path(cfg.output_dir) / "waits").exists()


def test_validation_without_cpus_of_its_own_fails_fast(ray_cluster, workdir, cifar_small):
    """The run's end waits for its validations: a task that can never get its CPUs must be refused at start."""
    from byol_ray.ray_train import launch

    train, val = cifar_small
    cfg = _cfg(workdir, "noval", f"data.train={train}", f"data.val={val}", "data.loader=torch", "eval.cpus=4")
    with pytest.raises(ConfigError, match=r"validation \(data.val\) needs eval.cpus=4 CPU\(s\) beside the 1 of the "
                                          r"workers, but the cluster has 4"):
        launch(cfg)
