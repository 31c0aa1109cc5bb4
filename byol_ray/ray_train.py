"""Ray Train edge: one TorchTrainer worker = the engine + DDP; the driver checks resources and launches."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from byol_ray.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from byol_ray.config import Config, ConfigError, derive, from_dict, save_resolved, to_dict
from byol_ray.engine import fit
from byol_ray.run import (ProgressPrinter, append_history, probe_writable, build_train_loader, check_data_source, data_fingerprint,
                          read_history, run_dir, training_file, with_history)
from byol_ray.tracking import (RUN_ID_FILE, TrackingReporter, build_tracker, check_tracking, finish_run,
                               resolve_tracking_uri, unfinished_run_id)
from byol_ray.train import print_summary


class RayReporter:
    """Rank 0 prints progress; every rank calls ``ray.train.report`` at epoch ends (it is a barrier)."""

    def __init__(self, rank: int, printer: ProgressPrinter, folder: Path) -> None:
        self.rank, self.printer, self.folder = rank, printer, folder

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0:
            self.printer(metrics, step)

    def epoch_end(self, metrics: dict[str, float], epoch: int, state: dict[str, Any] | None) -> None:
        import ray.train

        if self.rank == 0:
            append_history(self.folder, metrics)
        if state is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(state, Path(tmp) / CHECKPOINT_NAME)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function: build the loader shard, restore the latest checkpoint, run the engine."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(config)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.ray.cpus_per_worker)  # the worker's own CPU budget, not the host's
    device = ray.train.torch.get_device()
    path = training_file(cfg, is_main=ctx.get_local_rank() == 0)  # one conversion per node
    loader = build_train_loader(cfg, path, device, rank=rank, world_size=world_size)
    derived = derive(cfg, loader.num_samples, world_size)
    folder = run_dir(cfg)
    if rank == 0:
        save_resolved(cfg, derived, folder / "config.yaml")
    tracker = build_tracker(cfg, is_main=rank == 0)  # MLflow on rank 0 only
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(ckpt_dir, map_location=device)
        if rank == 0:
            print(f"[byol-ray] resuming from epoch {state['epoch']}, step {state['step']}", flush=True)
    fingerprint = data_fingerprint(cfg, path) if rank == 0 else {}
    # a restarted worker group logs into the MLflow run recorded in the checkpoint
    run_id = (state or {}).get("mlflow_run_id") or (unfinished_run_id(tracker, folder) if rank == 0 else None)
    tracker.start(cfg, derived=derived, run_id=run_id, data_fingerprint=fingerprint)
    if tracker.run_id is not None:
        (folder / RUN_ID_FILE).write_text(tracker.run_id)
    if state is not None and state["epoch"] >= cfg.train.epochs:
        # The newest checkpoint is the last epoch's: training had finished when the run was stopped (say a
        # Tune driver killed after the final checkpoint, before it recorded the trial as done). Nothing is
        # retrained; the final epoch's metrics are reported again so Ray Train and Tune see the result.
        final = (read_history(folder) or [{"epoch": state["epoch"], "step": state["step"]}])[-1] if rank == 0 else {}
        ray.train.report(final)  # every rank: a report is a barrier
    printer = ProgressPrinter(derived.total_steps, cfg.train.epochs, start_step=(state or {}).get("step", 0))
    reporter = TrackingReporter(RayReporter(rank, printer, folder), tracker)
    try:
        result = fit(cfg, derived, loader, device, reporter=reporter, state=state)
    except BaseException:
        tracker.finish("FAILED")
        raise
    if rank == 0:
        result = with_history(result, folder)
        version = finish_run(tracker, cfg, derived, result, folder, data_fingerprint=fingerprint)
        print_summary(cfg, result, cfg.ray.storage_path + "/" + cfg.run_name, tracker.run_id, version)


def check_storage(storage_path: str) -> None:
    if "://" in storage_path:
        return  # object stores are checked by Ray's own pyarrow filesystem at start
    try:
        probe_writable(Path(storage_path))
    except OSError as exc:
        raise ConfigError(f"ray.storage_path={storage_path!r} is not writable ({exc.strerror}); "
                          "choose a writable folder or a shared/object-store path") from None


def check_resources(cfg: Config) -> None:
    """Fail fast instead of waiting forever for a worker group the cluster cannot place."""
    import ray

    total = ray.cluster_resources()
    workers, cpus = cfg.ray.num_workers, cfg.ray.cpus_per_worker
    if cfg.ray.use_gpu and total.get("GPU", 0) < workers:
        raise ConfigError(
            f"ray.use_gpu=true asks for {workers} GPU worker(s) but the cluster has {int(total.get('GPU', 0))} GPU(s); "
            "set ray.use_gpu=false (CPU training) or lower ray.num_workers"
        )
    if total.get("CPU", 0) < workers * cpus:
        raise ConfigError(
            f"ray.num_workers={workers} x ray.cpus_per_worker={cpus} needs {workers * cpus} CPUs but the cluster "
            f"has {total.get('CPU', 0):g}; lower ray.num_workers or ray.cpus_per_worker"
        )


# Options of the in-process local Ray (the embedded default), set only when this process starts it.
# The dashboard stays: Ray Train V2's controller and placement-group cleaner query the State API it
# serves (without it, every run logs "Failed to query Ray Train Controller actor state" and stalls).
LOCAL_RAY_ENV = {
    # A private cluster needs no address other machines can reach: bind loopback. (Ray reads this at
    # import; the name is historical, on Linux it only picks 127.0.0.1.)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_enable_metrics_collection": "0",  # no Prometheus export from every process of a laptop run
    "RAY_prestart_worker_first_driver": "0",  # no idle workers polling beside the training worker
}


def init_ray(address: str = "") -> None:
    """Connect to ``address`` (or the job's cluster), else start a lean in-process local Ray."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)  # a user's own setting wins
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or None, log_to_driver=True)


def build_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer for ``cfg`` (Tune trials add a metrics-forwarding callback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_worker,
        train_loop_config=to_dict(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=cfg.ray.storage_path, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures, controller_failure_limit=3),
            # Train V2 re-routes print() through its logger, which shows every progress line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


def launch(cfg: Config, *, resume: bool = False):
    """Run ``cfg`` under a TorchTrainer; the same call serves a laptop, ``ray job submit`` and KubeRay.

    Args:
        cfg: a config with resolved paths.
        resume: continue the run named ``cfg.run_name`` in ``cfg.ray.storage_path`` (Ray restores the
            latest checkpoint; the engine continues its schedules, target and loader epoch).

    Returns:
        Ray's ``Result``.
    """
    check_data_source(cfg)
    check_storage(cfg.ray.storage_path)
    if cfg.mlflow.enabled:  # an unreachable tracking server fails now, not after hours of training
        check_tracking(resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir))
    init_ray(cfg.ray.address)  # before importing ray.train: init_ray sets Ray's import-time options
    check_resources(cfg)
    folder = run_dir(cfg)
    run_exists = (Path(cfg.ray.storage_path) / cfg.run_name).exists() if "://" not in cfg.ray.storage_path else False
    if run_exists and not resume:
        raise ConfigError(f"a run named {cfg.run_name!r} already exists in {cfg.ray.storage_path}; "
                          f"use --resume {cfg.run_name} to continue it or choose another run_name")
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:  # saved before any worker starts, so --resume works even after an early crash
        (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (folder / RUN_ID_FILE).unlink(missing_ok=True)  # a new run never reopens an older run's MLflow run
    result = build_trainer(cfg).fit()
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    m = result.metrics or {}
    print(f"[byol-ray] run {cfg.run_name} finished: epoch {m.get('epoch')}, step {m.get('step')}, "
          f"loss {m.get('epoch_loss', float('nan')):.4f}, probe acc {m.get('epoch_classifier_acc', float('nan')):.3f}")
    print(f"[byol-ray] checkpoint: {ckpt.path if ckpt else 'none'}")
    print(f"[byol-ray] run folder: {folder}")
    return result
