"""Starting a run or a search, for every launcher (``train --no-ray``, Ray Train, Tune): the start-up checks,
every one before anything is written, and what a failed or stopped start leaves behind.

A run that fails before its first epoch leaves nothing (its folder is removed, so the name is free again); a
stopped one (Ctrl-C, ``ray job stop``, SIGTERM) has its MLflow run marked KILLED and says how to continue.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from byol_ray.config import Config, ConfigError
from byol_ray.mlflow_store import check_tracking, is_local_store, resolve_tracking_uri
from byol_ray.progress import say
from byol_ray.run_folder import discard_failed_start, read_run_id, resolve_paths, run_dir, run_exists
from byol_ray.run_tags import ray_job_submission_id
from byol_ray.storage import check_writable, is_uri


def check_start(cfg: Config, *, on_ray: bool) -> Config:
    """Every check a launcher makes before it writes anything, the cheap ones before Ray starts.

    Args:
        cfg: the config as given (paths not yet resolved: a relative one is itself an error under Ray Jobs).
        on_ray: the run uses Ray (Ray Train or Tune): Ray is started or joined here, and the cluster's size and
            temporary directory are checked against the outputs.

    Returns:
        ``cfg`` with resolved paths (:func:`byol_ray.run_folder.resolve_paths`).
    """
    in_job = bool(ray_job_submission_id())
    check_outputs_outlive_job(cfg, in_job=in_job, multi_node=False)
    resolved = resolve_paths(cfg)
    if not on_ray:
        for key, value in (("ray.storage_path", resolved.ray.storage_path), ("output_dir", resolved.output_dir)):
            if is_uri(value):
                raise ConfigError(f"{key}={value!r} is an object-store URI, which only Ray Train writes to; a "
                                  f"--no-ray run keeps its checkpoints and run folder on a filesystem path (set "
                                  f"{key} to a folder, or run without --no-ray)")
    check_data(resolved)
    if on_ray:  # (a --no-ray run writes local folders only, and needs torch alone: no pyarrow filesystem probe)
        from byol_ray.ray_connect import init_ray

        check_storage(resolved)

        init_ray(resolved.ray.address)  # before anything imports ray.train: init_ray sets Ray's import-time options
        check_outputs_outlive_job(cfg, in_job=in_job, multi_node=_alive_nodes() > 1, ray_temp=_ray_temp())
    if resolved.mlflow.enabled:  # an unreachable tracking server fails now, not after hours of training
        check_tracking(resolve_tracking_uri(resolved.mlflow.tracking_uri, resolved.output_dir))
    return resolved


def check_outputs_outlive_job(cfg: Config, *, in_job: bool, multi_node: bool, ray_temp: str = "") -> None:
    """Refuse, before any work, outputs that a Ray job or a multi-node cluster would lose.

    Under Ray Jobs the entrypoint runs in Ray's temporary copy of ``--working-dir``, deleted after the job:
    a relative path (or anything that resolves inside Ray's temporary directory) vanishes with it. On more
    than one node, a store in one machine's files (sqlite) cannot be reached by workers elsewhere.

    Args:
        cfg: the config as given (paths not yet resolved).
        in_job: this process is a Ray job's entrypoint.
        multi_node: the cluster has more than one node.
        ray_temp: Ray's temporary directory ('' when unknown).
    """
    if not (in_job or multi_node):
        return
    where = "a Ray job's working directory is a temporary copy that Ray deletes" if in_job else \
        "on a multi-node cluster each node resolves it against its own disk"
    for key, value in (("output_dir", cfg.output_dir), ("ray.storage_path", cfg.ray.storage_path)):
        if not value or "://" in value:
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"{key}={value!r} is a relative path: {where}; set {key} to an absolute path on "
                              f"shared storage (e.g. /mnt/shared/byol-ray) or an object-store URI")
        if ray_temp and path.resolve().is_relative_to(Path(ray_temp).resolve()):
            raise ConfigError(f"{key}={value!r} is inside Ray's temporary directory {ray_temp}, deleted with the "
                              f"session; set {key} to a path on shared storage")
    if not cfg.mlflow.enabled:
        return
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
    if not is_local_store(uri):
        return
    fix = "set mlflow.tracking_uri=http://MLFLOW-HOST:5000 (a tracking server that serves artifacts) or export " \
          "MLFLOW_TRACKING_URI"
    if multi_node:
        raise ConfigError(f"the MLflow store {uri} is a file on this machine, which workers on other nodes cannot "
                          f"reach; {fix}")
    given = cfg.mlflow.tracking_uri.strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    path = given.split(":///", 1)[1] if ":///" in given else given.removeprefix("file:")
    if given and not path.startswith("/"):
        raise ConfigError(f"mlflow.tracking_uri={given!r} is a relative path: {where}; {fix}")
    local = uri.split(":///", 1)[1] if uri.startswith("sqlite:///") else uri.removeprefix("file://")
    if ray_temp and Path(local).resolve().is_relative_to(Path(ray_temp).resolve()):
        raise ConfigError(f"the MLflow store {uri} is inside Ray's temporary directory {ray_temp}; {fix}")


def check_data(cfg: Config) -> None:
    """Fail in the driver, before any worker starts, when the training or held-out data cannot be used."""
    from byol_ray.data import check_training_data
    from byol_ray.validation import check_val

    check_training_data(cfg.data.train, cfg.data.loader)
    check_val(cfg)


def check_storage(cfg: Config) -> None:
    """Fail in one line when the run folder or the checkpoint storage cannot be written (a local folder, or an
    object-store prefix: unknown scheme, unreachable endpoint, missing bucket, refused credentials)."""
    check_writable(cfg.output_dir, "output_dir")
    if cfg.ray.storage_path and cfg.ray.storage_path != cfg.output_dir:
        check_writable(cfg.ray.storage_path, "ray.storage_path")


@contextlib.contextmanager
def cleanup_on_failure(cfg: Config, *, resume: bool, continue_with: str):
    """Around a run: when it fails or is stopped, mark its MLflow run FAILED or KILLED if nothing else did (a
    driver stopped by ``ray job stop`` or Ctrl-C outlives its workers, which would have), remove what a new run
    wrote before its first epoch, and say how to continue a stopped run that has something to continue from.

    Args:
        cfg: the run's config (resolved paths).
        resume: the run was resumed (its folder is never removed).
        continue_with: the command that continues the run, said after a stop.
    """
    try:
        yield
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
        close_mlflow_run(cfg, "KILLED" if stopped else "FAILED")
        if not resume:
            discard_failed_start(cfg)
        if stopped and run_exists(cfg):
            say(f"stopped. Continue with: {continue_with}")
        raise


def close_mlflow_run(cfg: Config, status: str) -> None:
    """Mark the run's MLflow run ``status`` if it is still RUNNING (best effort, quick)."""
    try:
        run_id = read_run_id(run_dir(cfg)) if cfg.mlflow.enabled else None
    except OSError:
        return
    if not run_id:
        return
    try:
        from byol_ray.mlflow_store import answers, client

        uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
        if not answers(uri, timeout_s=2.0):  # `ray job stop` sends SIGKILL a few seconds after SIGTERM
            say(f"could not mark the MLflow run {status}: {uri} does not answer")
            return
        mlflow = client(uri)
        if mlflow.get_run(run_id).info.status == "RUNNING":
            mlflow.set_terminated(run_id, status=status)
            say(f"MLflow run {run_id} marked {status}")
    except Exception as exc:  # noqa: BLE001 - the original error matters more
        say(f"could not mark the MLflow run {status}: {type(exc).__name__}: {exc}")


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _ray_temp() -> str:
    """Ray's temporary directory on this node ('' when Ray does not say)."""
    try:
        import ray

        return ray._private.worker._global_node.get_temp_dir_path()  # no public API for it in Ray 2.60
    except Exception:  # noqa: BLE001 - the check it serves then relies on the relative-path rule alone
        return ""

