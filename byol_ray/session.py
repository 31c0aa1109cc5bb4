"""One home for a training run's lifecycle, whichever launcher runs it: data, tracker, fit, finish.

The sequence is: prepare or reuse the data → save the config → open or reopen the tracking run → fit →
history → artifacts and registration → outcome. The local launcher (``train.py``) and the Ray Train worker
(``ray_train.py``) only supply what differs: where the process sits (:class:`Placement`), the state to resume
from, and the reporter that saves checkpoints their way. What runs before (the start-up checks) is
``launch.py``'s, where a run's files live is ``run_folder.py``'s, and the rules of ``--resume`` are
``resume.py``'s.
"""
from __future__ import annotations

import shlex
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from byol_ray.config import Config, Derived, derive, to_dict
from byol_ray.data.cache import training_file
from byol_ray.data.loaders import run_loader
from byol_ray.data.sources import training_fingerprint
from byol_ray.engine import Reporter, fit
from byol_ray.history import read_history
from byol_ray.progress import ProgressPrinter, say
from byol_ray.run_folder import (RunOutcome, checkpoint_dir, run_dir, write_config, write_outcome, write_run_id)
from byol_ray.storage import Location, location
from byol_ray.tracker import NullTracker, Tracker, TrackingReporter, build_tracker, logged_through, unfinished_run_id


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Placement:
    """Where this process sits: all a launcher knows that the lifecycle does not."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def run(cfg: Config, where: Placement, *, state: dict[str, Any] | None,
        make_reporter: Callable[[ProgressPrinter], Reporter]) -> RunOutcome | None:
    """Train ``cfg`` from ``state`` (or from scratch) in this process, as one rank of ``where``.

    Args:
        cfg: a config with resolved paths.
        where: rank, world size and device of this process.
        state: the checkpoint state to resume from (None: a fresh start).
        make_reporter: the launcher's :class:`~byol_ray.engine.Reporter` (progress, checkpoints), given the
            progress printer; its ``replay(metrics)`` is called on every rank when ``state`` is already the last
            epoch's.

    Returns:
        The :class:`RunOutcome` on rank 0, None on the other ranks.
    """
    main = where.rank == 0
    path = training_file(cfg)  # one conversion per machine, under a file lock
    loader = run_loader(cfg, path, where.device, rank=where.rank, world_size=where.world_size)
    derived = derive(cfg, loader.num_samples, where.world_size)
    folder = run_dir(cfg)
    tracker = build_tracker(cfg, is_main=main)  # MLflow on rank 0 only
    fingerprint = training_fingerprint(cfg.data.train, path) if main else {}
    if main:
        write_config(cfg, derived)
    # a restarted run logs into the MLflow run its checkpoint (or, before the first one, its folder) names
    run_id = (state or {}).get("mlflow_run_id") or (unfinished_run_id(tracker, folder) if main else None)
    tracker.start(cfg, derived=derived, run_id=run_id, data_fingerprint=fingerprint)
    if tracker.run_id is not None:
        write_run_id(cfg, tracker.run_id)
    if state is not None:  # each restart (failure, preemption, resize, --resume) is an event of the run
        tracker.log_metrics({"restart_step": float(state["step"]), "restart_world_size": float(where.world_size)},
                            int(state["step"]))
    start_step = (state or {}).get("step", 0)
    reporter = make_reporter(ProgressPrinter(derived.total_steps, cfg.train.epochs, start_step=start_step))
    if state is not None and state["epoch"] >= cfg.train.epochs:
        # Training had finished when the run was stopped (say a Tune driver killed after the final checkpoint):
        # nothing is retrained; the final metrics are reported again so that Ray Train and Tune see them.
        reporter.replay((read_history(folder) or [{"epoch": state["epoch"], "step": state["step"]}])[-1])
    try:
        through = logged_through(tracker) if run_id else -1
        result = fit(cfg, derived, loader, where.device, reporter=TrackingReporter(reporter, tracker, through),
                     state=state)
    except BaseException as exc:
        tracker.finish("KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    if not main:
        return None
    history = read_history(folder)
    metrics = result.metrics or (history or [{}])[-1]
    version = finish(tracker, cfg, derived, result.engine.online.encoder, history, metrics, folder, fingerprint)
    outcome = RunOutcome(cfg.run_name, str(folder), str(checkpoint_dir(cfg)), metrics, tracker.run_id,
                         getattr(tracker, "tracking_uri", ""), version)
    write_outcome(cfg, outcome)  # for a launcher elsewhere (the Ray driver) to read back
    return outcome


def finish(tracker: Tracker, cfg: Config, derived: Derived, encoder, history: list[dict[str, float]],
           metrics: dict[str, float], folder: Location | Path, fingerprint: dict[str, Any]) -> str | None:
    """The end of a successful run on rank 0: config and plots as artifacts, the online encoder registered
    once (``mlflow.register_name``), the run closed FINISHED even when registration fails.

    Returns:
        The registered ``name/version``, or None.
    """
    from byol_ray.plots import plot_curves
    from byol_ray.registry import register_run_encoder

    if isinstance(tracker, NullTracker):
        return None
    folder = location(folder)
    if not tracker.reachable():  # a lost server: end now and say how to log the rest later
        from byol_ray.checkpoint import checkpoint_dir_name

        final = checkpoint_dir(cfg) / checkpoint_dir_name(int(metrics.get("epoch", cfg.train.epochs)))
        register = (f"; register the encoder when it is back: byol-ray register --checkpoint {final} "
                    f"mlflow.tracking_uri={tracker.tracking_uri} mlflow.register_name={cfg.mlflow.register_name}"
                    if cfg.mlflow.register_name else "")
        say(f"MLflow server {tracker.tracking_uri} does not answer: run {tracker.run_id} stays RUNNING there without "
            f"its end (plots, registration). Every epoch's metrics are in {folder / 'metrics.jsonl'} and the "
            f"checkpoints in {checkpoint_dir(cfg)}{register}")
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="byol-artifacts-") as tmp:
            if (folder / "config.yaml").is_file():
                (Path(tmp) / "config.yaml").write_bytes((folder / "config.yaml").read_bytes())
                tracker.log_artifact(Path(tmp) / "config.yaml")
            plots = plot_curves(history, Path(tmp) / "plots")
            for plot in plots:
                tracker.log_artifact(plot, "plots")
            if plots:
                (folder / "plots").upload_tree(Path(tmp) / "plots")  # beside metrics.jsonl, wherever that is
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the encoder matters more
        warnings.warn(f"MLflow: run artifacts not logged ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=2)
    try:
        version = register_run_encoder(
            tracker, encoder, name=cfg.mlflow.register_name, cfg_dict=to_dict(cfg, derived),
            metadata={"epochs": int(metrics.get("epoch", cfg.train.epochs)), "step": int(metrics.get("step", 0)),
                      "metrics": metrics, "data_fingerprint": fingerprint})
    finally:
        tracker.finish("FINISHED")
    return f"{version.name}/{version.version}" if version is not None else None


def print_summary(cfg: Config, outcome: RunOutcome) -> None:
    """The end-of-run summary: metrics, where things are, and how a downstream job pulls the encoder."""
    m = outcome.metrics
    say(f"run {cfg.run_name} finished: epoch {m.get('epoch')}, step {m.get('step')}, "
        f"loss {m.get('epoch_loss', float('nan')):.4f}, probe acc {m.get('epoch_classifier_acc', float('nan')):.3f}")
    if "val_knn_top1" in m:
        say(f"held-out kNN top-1 {m['val_knn_top1']:.3f} (checkpoint of step {m.get('val_step')}, data.val)")
    say(f"run folder: {outcome.folder}")
    say(f"checkpoints: {outcome.checkpoints}")
    if outcome.run_id is None:
        return
    uri = outcome.tracking_uri
    say(f"MLflow run {outcome.run_id} in {uri}")
    if uri.startswith("sqlite:"):
        say(f"open the UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    if outcome.registered:
        say(f"registered encoder: models:/{outcome.registered}")
        say(f"evaluate it:  MLFLOW_TRACKING_URI={shlex.quote(uri)} byol-ray linear-eval --model "
            f"models:/{outcome.registered} --train {shlex.quote(cfg.data.train)}")
