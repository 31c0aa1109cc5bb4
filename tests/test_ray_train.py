"""Ray Train on a real local cluster (head + second node on loopback): DDP, sharding, resume, fail-fast checks (a
killed worker: the end-to-end case, tests/test_end_to_end.py)."""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from byol_ray.config import ConfigError
from byol_ray.run_folder import checkpoint_dir
from ray_runs import STEPS_PER_EPOCH, final_state, read_history, run_config, this_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray_train")


def test_two_worker_cpu_run_completes_and_learns(two_worker_run):
    cfg, result = two_worker_run
    history = read_history(cfg)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert {h["torch_threads"] for h in history} == {1}  # ray.cpus_per_worker=1
    assert history[-1]["epoch_loss"] < history[0]["epoch_loss"] - 0.05
    state = final_state(cfg)
    assert state["step"] == 4 * STEPS_PER_EPOCH and state["config"]["derived"]["world_size"] == 2
    assert result.checkpoints == str(checkpoint_dir(cfg)) and result.metrics["epoch"] == 4


def test_epoch_metrics_describe_both_workers_not_rank_0(two_worker_run):
    cfg, _ = two_worker_run
    for row in read_history(cfg):
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
    cfg = run_config(workdir, "shards", "ray.num_workers=2", "train.batch_size=32", "model.num_classes=256")
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
        for actor in list_actors(address=this_cluster(), limit=10_000,
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

    # 2 CPUs per worker place one on each node; torch on 1 thread each, as both nodes share this machine's 2 cores
    cfg = run_config(workdir, "multinode", "train.epochs=1", "ray.num_workers=2", "ray.cpus_per_worker=2",
                     "ray.torch_threads=1")
    def workers():
        return list_actors(address=this_cluster(), filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)

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
    assert final_state(cfg)["epoch"] == 1
    assert [r["torch_threads"] for r in read_history(cfg)] == [1]
    assert listening, "no listening socket of a training worker was seen"
    everywhere = listening & {"0.0.0.0", "::"}
    assert not everywhere, f"a training worker listened on every interface ({sorted(listening)})"
    assert all(ip.removeprefix("::ffff:") == "127.0.0.1" for ip in listening), sorted(listening)


def test_explicit_resume_of_a_finished_run_is_a_no_op_and_a_rerun_is_refused(two_worker_run):
    from byol_ray.ray_train import launch

    cfg, _ = two_worker_run
    with pytest.raises(ConfigError, match="already exists.*--resume straight"):
        launch(cfg)
    # resuming a run whose newest checkpoint is its last epoch retrains nothing, writes nothing and
    # still reports the final epoch (a Tune trial restarted after its last checkpoint needs that result)
    history, state = read_history(cfg), final_state(cfg)
    folder = Path(checkpoint_dir(cfg))
    before = sorted(p.name for p in folder.glob("epoch_*"))
    result = launch(cfg, resume=True)
    assert result.metrics["epoch"] == 4 and result.metrics["epoch_loss"] == history[-1]["epoch_loss"]
    assert read_history(cfg) == history
    assert sorted(p.name for p in folder.glob("epoch_*")) == before
    assert final_state(cfg)["step"] == state["step"]

    # Ray Train's own record of the run gone, as when its controller is stopped (Ctrl-C, a stopped job) between a
    # checkpoint's upload and its registration: the run still continues from its newest checkpoint, not from scratch
    # over the checkpoints it has (observed in CI: a Ctrl-C'd run resumed at step 0 and rewrote them)
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    (folder / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).unlink()
    written = {p: p.stat().st_mtime_ns for p in folder.glob("epoch_*/*")}
    result = launch(cfg, resume=True)
    assert result.metrics["epoch"] == 4 and result.metrics["epoch_loss"] == history[-1]["epoch_loss"]
    assert read_history(cfg) == history
    assert {p: p.stat().st_mtime_ns for p in folder.glob("epoch_*/*")} == written


@pytest.mark.parametrize("override,pattern", [
    ("ray.use_gpu=true", r"asks for 1 GPU worker\(s\) but the cluster has 0 GPU"),
    ("ray.num_workers=8", r"needs 8 CPUs but the cluster has 4; lower ray.num_workers or ray.cpus_per_worker; on a "
                          r"cluster that grows, ray.wait_for_workers_s=SECONDS waits for its nodes"),
    ("data.train=/nonexistent/train.beton", r"data.train='/nonexistent/train.beton' does not exist"),
    ("ray.storage_path=/etc/hostname/ray", r"ray.storage_path='/etc/hostname/ray' is not writable"),
])
def test_bad_input_fails_fast(ray_cluster, workdir, override, pattern):
    from byol_ray.ray_train import launch

    cfg = run_config(workdir, "bad", "train.batch_size=64", override)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=pattern):
        launch(cfg)
    assert time.monotonic() - start < 10


def test_a_group_that_does_not_fit_waits_only_as_long_as_asked(ray_cluster, workdir):
    """ray.wait_for_workers_s: the run asks for its workers and waits; when the time is up it says what is missing
    and which key to change, and has written nothing."""
    from byol_ray.ray_train import launch

    cfg = run_config(workdir, "waits", "train.batch_size=64", "ray.num_workers=8", "ray.wait_for_workers_s=3")
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
    cfg = run_config(workdir, "noval", f"data.train={train}", f"data.val={val}", "data.loader=torch", "eval.cpus=4")
    with pytest.raises(ConfigError, match=r"validation \(data.val\) needs eval.cpus=4 CPU\(s\) beside the 1 of the "
                                          r"workers, but the cluster has 4"):
        launch(cfg)
