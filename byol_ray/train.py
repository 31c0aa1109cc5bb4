"""Single-process training (no Ray): the engine on one device, checkpoints in the run folder."""
from __future__ import annotations

from byol_ray.checkpoint import latest_checkpoint, load_checkpoint
from byol_ray.config import Config, derive, save_resolved
from byol_ray.engine import FitResult, fit, pick_device
from byol_ray.run import (LocalReporter, ProgressPrinter, build_train_loader, data_fingerprint, run_dir,
                          training_file, with_history)
from byol_ray.tracking import TrackingReporter, build_tracker, finish_run


def train_local(cfg: Config, *, resume: bool = False) -> FitResult:
    """Train ``cfg`` in this process; with ``resume``, continue from the run folder's latest checkpoint.

    The run is tracked in MLflow (``mlflow.enabled``) and its online encoder registered at the end.

    Args:
        cfg: a config whose paths are already resolved (:func:`byol_ray.run.resolve_paths`).
        resume: continue ``cfg.run_name`` from its newest checkpoint (and MLflow run) instead of starting fresh.

    Returns:
        The engine's :class:`FitResult`.
    """
    tracker = build_tracker(cfg)  # first: an unusable tracking store fails before any data work
    device = pick_device(cfg.train.device)
    path = training_file(cfg)
    loader = build_train_loader(cfg, path, device)
    derived = derive(cfg, loader.num_samples, world_size=1)
    folder = run_dir(cfg)
    state = None
    if resume:
        latest = latest_checkpoint(folder / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"no checkpoint to resume under {folder / 'checkpoints'}")
        state = load_checkpoint(latest, map_location=device)
    save_resolved(cfg, derived, folder / "config.yaml")
    fingerprint = data_fingerprint(cfg, path)
    tracker.start(cfg, derived=derived, run_id=(state or {}).get("mlflow_run_id"), data_fingerprint=fingerprint)
    printer = ProgressPrinter(derived.total_steps, cfg.train.epochs, start_step=(state or {}).get("step", 0))
    reporter = TrackingReporter(LocalReporter(folder, printer, num_to_keep=cfg.ray.num_to_keep), tracker)
    try:
        result = fit(cfg, derived, loader, device, reporter=reporter, state=state)
    except BaseException as exc:
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    result = with_history(result, folder)
    version = finish_run(tracker, cfg, derived, result, folder, data_fingerprint=fingerprint)
    print_summary(cfg, result, folder / "checkpoints", tracker.run_id, version)
    return result


def print_summary(cfg: Config, result: FitResult, checkpoints, run_id: str | None, version) -> None:
    """The end-of-run summary: metrics, where things are, and how a downstream job pulls the encoder."""
    from byol_ray.tracking import resolve_tracking_uri

    m = result.metrics
    print(f"[byol-ray] run {cfg.run_name} done: {result.steps} steps, {result.epochs} epochs, "
          f"loss {m.get('epoch_loss', float('nan')):.4f}, probe acc {m.get('epoch_classifier_acc', float('nan')):.3f}")
    print(f"[byol-ray] checkpoints: {checkpoints}")
    if run_id is None:
        return
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
    print(f"[byol-ray] MLflow run {run_id} in {uri}")
    if uri.startswith("sqlite:"):
        print(f"[byol-ray] open the UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    if version is not None:
        print(f"[byol-ray] registered encoder: models:/{version.name}/{version.version}")
        print(f"[byol-ray] evaluate it:  byol-ray linear-eval --model models:/{version.name}/{version.version} "
              f"--tracking-uri {uri} --train {cfg.data.train}")
