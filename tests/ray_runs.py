"""Tiny Ray Train runs on the session's cluster, as the Ray Train and end-to-end cases build, read and disturb them.

The reference uninterrupted two-worker run (``STRAIGHT``) is a session fixture (``two_worker_run`` in
``fixtures_ray.py``): the Ray Train cases read it, and the end-to-end case's run, the same recipe with a worker
killed mid-run and MLflow on, must end with its weights.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

from byol_ray.checkpoint import load_checkpoint
from byol_ray.config import load_config
from byol_ray.run_folder import checkpoint_dir, resolve_paths

TINY = ["model.projector_hidden_dim=128", "model.predictor_hidden_dim=128", "model.projector_dim=64",
        "train.batch_size=64", "train.log_every_steps=10", "train.checkpoint_every_epochs=1",
        "mlflow.enabled=false"]
# the reference run's recipe: 2 workers (gloo), 4 epochs of the built-in digits, the torch loader (the FFCV path is
# covered by the shard and multi-node cases)
STRAIGHT = ["train.epochs=4", "ray.num_workers=2", "data.loader=torch"]
STEPS_PER_EPOCH = 1797 // 64  # the demo's built-in digits, full batches


def run_config(tmp: Path, name: str, *extra: str):
    return resolve_paths(load_config(["demo"], [
        *TINY, f"run_name={name}", f"output_dir={tmp}/runs", f"ray.storage_path={tmp}/ray",
        f"data.cache_dir={tmp}/cache", *extra,
    ]))


def read_history(cfg) -> list[dict]:
    path = Path(cfg.output_dir) / cfg.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_state(cfg):
    ckpts = sorted(Path(checkpoint_dir(cfg)).glob("epoch_*/state.pt"))
    assert ckpts, "no checkpoint was written"
    return load_checkpoint(ckpts[-1])


def this_cluster() -> str:
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

    alive = list_actors(address=this_cluster(), limit=10_000,
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
