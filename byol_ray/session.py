"""One home for a training run's lifecycle, whichever launcher runs it: paths, data, tracker, fit, finish.

The sequence is: resolve and save the config → prepare or reuse the data → open or reopen the tracking run
→ fit → history → artifacts and registration → summary. The local launcher (``train.py``) and the Ray Train
worker (``ray_train.py``) only supply what differs: where the process sits (:class:`Placement`), the state
to resume from, and the reporter that saves checkpoints their way.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from byol_ray.config import Config, ConfigError, Derived, derive, from_dict, to_dict, with_values
from byol_ray.engine import Reporter, fit
from byol_ray.history import read_history
from byol_ray.mlflow_store import is_local_store, resolve_tracking_uri
from byol_ray.progress import ProgressPrinter, say
from byol_ray.storage import Location, is_uri, location
from byol_ray.tracker import (RUN_ID_FILE, NullTracker, Tracker, TrackingReporter, build_tracker, logged_through,
                              unfinished_run_id)

STORED_SIDE_RATIO = 384 / 224  # long side stored by an automatic conversion, per pixel of training resolution
# Settings that --resume may change: how the run is executed, never what it computes.
# The group size is one of them: the global batches, crops, augmentations and schedules do not depend on it.
RESUMABLE_KEYS = ("data.num_workers", "data.cache_dir", "data.val", "train.log_every_steps",
                  "train.checkpoint_every_epochs", "train.checkpoint_every_steps", "train.interruptions_per_node_hour",
                  "train.device", "ray.address",
                  "ray.num_workers", "ray.min_workers", "ray.cpus_per_worker", "ray.max_failures", "ray.num_to_keep",
                  "ray.preemption_poll_steps", "ray.wait_for_workers_s", "ray.checkpoint_upload", "ray.resize_check_s",
                  "eval.every_epochs",
                  "eval.cpus", "eval.knn_k", "eval.knn_temperature", "eval.bank_size", "eval.val_size",
                  "eval.batch_size",
                  "mlflow.register_name", "mlflow.system_metrics_every_s")


# ----------------------------------------------------------------------------- where a run lives


def resolve_paths(cfg: Config) -> Config:
    """Make every path absolute and give the run a name, so Ray workers (which chdir) find them.

    Returns:
        A new config; ``cfg`` is not modified.
    """
    run_name = cfg.run_name or time.strftime("byol-%Y%m%d-%H%M%S")
    train, val = cfg.data.train, cfg.data.val
    if train != "demo" and not is_uri(train):
        train = str(Path(train).expanduser().resolve())
    if val and val != "demo" and not is_uri(val):
        val = str(Path(val).expanduser().resolve())
    storage = cfg.ray.storage_path
    if storage and not is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    output_dir = cfg.output_dir if is_uri(cfg.output_dir) else str(Path(cfg.output_dir).expanduser().resolve())
    return dataclasses.replace(
        cfg, run_name=run_name, output_dir=output_dir,
        data=dataclasses.replace(cfg.data, train=train, val=val, cache_dir=str(Path(cfg.data.cache_dir).expanduser().resolve())),
        ray=dataclasses.replace(cfg.ray, storage_path=storage),
    )


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


def run_dir(cfg: Config) -> Location:
    """``<output_dir>/<run_name>``: config.yaml, metrics.jsonl, plots, the MLflow run id (a local folder, or a
    prefix in an object store when ``output_dir`` is a URI)."""
    return Location(cfg.output_dir) / cfg.run_name


def storage_root(cfg: Config) -> str:
    """Where checkpoints are kept: ``ray.storage_path``, or ``output_dir`` when that is ''."""
    return cfg.ray.storage_path or cfg.output_dir


def checkpoint_dir(cfg: Config) -> Location:
    """``<storage root>/<run_name>/checkpoints``: the one place every launcher writes ``epoch_NNNN/`` (joined as a
    path, so an object-store URI keeps its query, e.g. ``?endpoint_override=...``, at the end)."""
    return Location(storage_root(cfg)) / cfg.run_name / "checkpoints"


def checkpoints_newest_first(cfg: Config) -> list[Location]:
    """The run's ``epoch_NNNN[-step_SSSSSSSS]`` folders, on disk or in the object store, newest first."""
    from byol_ray.checkpoint import CHECKPOINT_DIR_RE

    folder = checkpoint_dir(cfg)
    found = sorted((int(m.group(1)), int(m.group(2) or -1), name) for name in folder.children()
                   if (m := CHECKPOINT_DIR_RE.fullmatch(name)))
    return [folder / name for *_, name in reversed(found)]


def latest_checkpoint(cfg: Config) -> "Path | Location | None":
    """The run's newest ``epoch_NNNN[-step_SSSSSSSS]/state.pt``, on disk or in the object store, or None."""
    from byol_ray.checkpoint import CHECKPOINT_NAME

    for folder in checkpoints_newest_first(cfg):
        if (folder / CHECKPOINT_NAME).is_file():
            return Path(folder / CHECKPOINT_NAME) if not folder.remote else folder / CHECKPOINT_NAME
    return None


def load_resume_state(cfg: Config, map_location: Any, restored: "str | Path | None" = None,
                      restored_name: str = "") -> dict[str, Any]:
    """The state a resumed run continues from: ``restored`` (the checkpoint folder Ray Train hands back) or the
    run's newest checkpoint (``restored_name``: the name of Ray's folder in the storage, ``epoch_NNNN...``; Ray
    may hand back a local copy under another name). One that cannot be read (truncated by a crash, a full disk or a bad copy) is skipped
    for the next newest intact one, and said so; a run with checkpoints never silently trains from scratch.

    Raises:
        ConfigError: when no checkpoint of the run can be read (naming each and why).
    """
    from byol_ray.checkpoint import CHECKPOINT_NAME, load_checkpoint

    failed: list[str] = []
    if restored is not None:
        try:
            return load_checkpoint(restored, map_location=map_location)
        except ConfigError as exc:
            failed.append(str(exc))
            say(f"{exc}; falling back to the newest intact checkpoint")
    for folder in checkpoints_newest_first(cfg):
        if restored is not None and folder.name >= (restored_name or Path(str(restored)).name):
            continue  # the one Ray handed back, and any newer that Ray did not register as complete
        state_file = folder / CHECKPOINT_NAME
        if not state_file.is_file():
            continue
        try:
            if state_file.remote:
                with tempfile.TemporaryDirectory() as tmp:
                    state_file.download(Path(tmp) / CHECKPOINT_NAME)
                    state = load_checkpoint(Path(tmp) / CHECKPOINT_NAME, map_location=map_location)
            else:
                state = load_checkpoint(Path(state_file), map_location=map_location)
        except ConfigError as exc:
            failed.append(str(exc))
            say(f"{exc}; trying the one before it")
            continue
        if failed:
            say(f"resuming {cfg.run_name} from {folder.name}, its newest intact checkpoint")
        return state
    raise ConfigError(f"cannot resume {cfg.run_name!r}: no checkpoint in {checkpoint_dir(cfg)} can be read ("
                      + "; ".join(failed) + "); start a new run (run_name=...)")


def run_exists(cfg: Config) -> bool:
    """A run of this name already started here (its config or checkpoints exist, on disk or in the bucket)."""
    return (run_dir(cfg) / "config.yaml").exists() or checkpoint_dir(cfg).exists()


def check_new_or_resume(cfg: Config, resume: bool) -> None:
    """Refuse to start over an existing run (nothing already written is overwritten) or to resume none."""
    exists = run_exists(cfg)
    if exists and not resume:
        raise ConfigError(f"a run named {cfg.run_name!r} already exists in {cfg.output_dir}; use --resume "
                          f"{cfg.run_name} to continue it, or choose another run_name=...")
    if resume and not exists:
        raise ConfigError(f"cannot resume {cfg.run_name!r}: nothing of it in {run_dir(cfg)}; check the run name "
                          f"and output_dir={cfg.output_dir}")


def announce_resume(cfg: Config, *, ray_picks: bool = False) -> "Path | Location | None":
    """Say, from the driver, where ``--resume`` continues ``cfg.run_name``; return its newest checkpoint.

    A run interrupted before its first checkpoint is started again from step 0 under its name, with its saved
    config: its epoch history is cleared (its unfinished MLflow run is reopened, as after a crash), so the
    new attempt's history holds every epoch once."""
    latest = latest_checkpoint(cfg)
    if latest is not None and ray_picks:  # Ray Train restores the newest one its controller recorded as complete
        say(f"resuming {cfg.run_name} from the latest checkpoint Ray Train recorded as complete (newest in "
            f"{checkpoint_dir(cfg)}: {location(latest).parent.name})")
        return latest
    if latest is not None:
        say(f"resuming {cfg.run_name} from its checkpoint {location(latest).parent.name} in {checkpoint_dir(cfg)}")
        return latest
    folder = run_dir(cfg)
    for name in ("metrics.jsonl", "validation.jsonl"):  # the MLflow run (mlflow_run_id) is reopened, as after a crash
        (folder / name).unlink()
    say(f"{cfg.run_name} stopped before its first checkpoint: starting it again from step 0 with its saved config")
    return None


def resume_config(output_dir: str, name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config a resumed run continues with: its own saved one, plus overrides that do not change the recipe.

    Args:
        output_dir: where the run folder is.
        name: the run name.
        overrides: ``key=value`` strings given with ``--resume``.

    Returns:
        The saved config with the allowed overrides applied; raises :class:`ConfigError` naming any override
        that would change what the run computes (its schedules follow the saved config).
    """
    saved = Location(output_dir) / name / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"cannot resume {name!r}: {saved} not found; check --resume and output_dir={output_dir}")
    base = dataclasses.replace(from_dict(yaml.safe_load(saved.read_text())), run_name=name)
    values = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
    values.pop("run_name", None)
    values.pop("output_dir", None)
    cfg = with_values(base, values)
    before, after = _flat(to_dict(base)), _flat(to_dict(cfg))
    changed = sorted(k for k in after if after[k] != before.get(k) and k not in RESUMABLE_KEYS)
    if changed:
        what = ", ".join(f"{k} ({before.get(k)!r} -> {after[k]!r})" for k in changed)
        raise ConfigError(f"--resume {name} keeps the run's recipe, but the overrides change {what}: the run's "
                          f"schedules and data order follow its saved config. Start a new run instead "
                          f"(run_name=...), or change only {', '.join(RESUMABLE_KEYS)}")
    return cfg


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------- data


def check_data(cfg: Config) -> None:
    """Fail in the driver, before any worker starts, when the training data cannot be used."""
    from byol_ray.data import check_training_data
    from byol_ray.validation import check_val

    check_training_data(cfg.data.train, cfg.data.loader)
    check_val(cfg)


def training_file(cfg: Config) -> str:
    """The path the loader reads: the .beton itself, a node-local copy of one in an object store, or one
    prepared once into the cache.

    An object-store ``data.train`` (``s3://bucket/train.beton``) is copied once per node into ``data.cache_dir``
    and verified (:func:`byol_ray.data.cache.stage`). With the FFCV loader a non-.beton source is converted on
    first use into ``data.cache_dir/<source>-<fingerprint>-<max side>px.beton``. Either happens once per machine,
    under a file lock, with a progress bar (:func:`byol_ray.data.cache.once_per_machine`). With the torch and
    memory loaders a local source itself is returned.
    """
    from byol_ray.data import cache, sources

    train = cfg.data.train
    if is_uri(train):
        return cache.stage(train, cfg.data.cache_dir, "data.train")
    if cfg.data.loader in ("torch", "memory") or train.endswith(".beton"):
        return train
    fp = sources.fingerprint(train)
    stem = "demo" if train == "demo" else Path(train).name
    # stored long side: 384 px for 224-px training (the ImageNet trade, docs/benchmarks.md "Stored resolution
    # for ImageNet"), the same ratio for other resolutions; FFCV never enlarges, so CIFAR stays 32x32
    max_resolution = max(round(cfg.data.resolution * STORED_SIDE_RATIO), 32)
    out = Path(cfg.data.cache_dir) / f"{stem}-{fp['sha256'][:12]}-{max_resolution}px.beton"

    def convert() -> None:
        from byol_ray.data import prepare as prep

        say(f"preparing {train} -> {out} (once; later runs reuse it)")
        prep.prepare(train, str(out), max_resolution=max_resolution, progress=sys.stderr.isatty())

    return str(cache.once_per_machine(out, convert, what=train))


def data_fingerprint(cfg: Config, path: str) -> dict[str, Any]:
    """What the run trained on, for MLflow tags and the model card (no image is decoded).

    A .beton carries its source's fingerprint in the ``<file>.json`` written by ``byol-ray prepare``.
    """
    if path.endswith(".beton"):
        sidecar = Path(f"{path}.json")
        if not sidecar.exists():
            return {"file": path}
        info = json.loads(sidecar.read_text()).get("source", {})
    else:
        from byol_ray.data import sources

        info = sources.fingerprint(cfg.data.train)
    return {k: v for k, v in info.items() if k != "class_names"}


def train_loader(cfg: Config, path: str, device: torch.device, *, rank: int = 0, world_size: int = 1):
    """The two-view loader of one worker: its share of every global batch (the same global batches whatever the
    world size)."""
    from byol_ray.data.loaders import build_train_loader

    from byol_ray.dist import batch_share

    return build_train_loader(
        path, backend=cfg.data.loader, batch_size=batch_share(cfg.train.batch_size, world_size, rank)[1],
        global_batch=cfg.train.batch_size,
        resolution=cfg.data.resolution, crop_scale=cfg.data.crop_scale, crop_ratio=cfg.data.crop_ratio,
        crop_law=cfg.data.crop_law, flip_prob=cfg.data.flip_prob, num_workers=cfg.data.num_workers,
        seed=cfg.train.seed, distributed=world_size > 1, rank=rank, world_size=world_size, device=device,
    )


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Placement:
    """Where this process sits: all a launcher knows that the lifecycle does not."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


@dataclass
class RunOutcome:
    """What a finished run leaves behind (rank 0): for the summary and a ``--json`` result."""

    run_name: str
    folder: str
    checkpoints: str
    metrics: dict[str, float]
    run_id: str | None = None
    tracking_uri: str = ""
    registered: str | None = None  # "name/version"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run(cfg: Config, where: Placement, *, state: dict[str, Any] | None,
        make_reporter: Callable[[ProgressPrinter], Reporter]) -> RunOutcome | None:
    """Train ``cfg`` from ``state`` (or from scratch) in this process, as one rank of ``where``.

    Args:
        cfg: a config with resolved paths.
        where: rank, world size and device of this process.
        state: the checkpoint state to resume from (None: a fresh start).
        make_reporter: the launcher's reporter (progress, checkpoints), given the progress printer. It may
            have ``replay(metrics)``, called on every rank when ``state`` is already the last epoch's.

    Returns:
        The :class:`RunOutcome` on rank 0, None on the other ranks.
    """
    main = where.rank == 0
    path = training_file(cfg)  # one conversion per machine, under a file lock
    loader = train_loader(cfg, path, where.device, rank=where.rank, world_size=where.world_size)
    derived = derive(cfg, loader.num_samples, where.world_size)
    folder = run_dir(cfg)
    tracker = build_tracker(cfg, is_main=main)  # MLflow on rank 0 only
    fingerprint = data_fingerprint(cfg, path) if main else {}
    if main:
        (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg, derived), sort_keys=False))
    # a restarted run logs into the MLflow run its checkpoint (or, before the first one, its folder) names
    run_id = (state or {}).get("mlflow_run_id") or (unfinished_run_id(tracker, folder) if main else None)
    tracker.start(cfg, derived=derived, run_id=run_id, data_fingerprint=fingerprint)
    if tracker.run_id is not None:
        (folder / RUN_ID_FILE).write_text(tracker.run_id)
    if state is not None:  # each restart (failure, preemption, resize, --resume) is an event of the run
        tracker.log_metrics({"restart_step": float(state["step"]), "restart_world_size": float(where.world_size)},
                            int(state["step"]))
    start_step = (state or {}).get("step", 0)
    reporter = make_reporter(ProgressPrinter(derived.total_steps, cfg.train.epochs, start_step=start_step))
    if state is not None and state["epoch"] >= cfg.train.epochs and hasattr(reporter, "replay"):
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
    return RunOutcome(cfg.run_name, str(folder), str(checkpoint_dir(cfg)), metrics, tracker.run_id,
                      getattr(tracker, "tracking_uri", ""), version)


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


def discard_failed_start(cfg: Config) -> None:
    """Remove the folder of a new run that failed before it finished an epoch, so the name is free again."""
    ckpts = checkpoint_dir(cfg)
    try:
        if any(n.startswith("epoch_") for n in ckpts.children()) or (run_dir(cfg) / "metrics.jsonl").exists():
            return
        run_dir(cfg).remove_tree()
        ckpts.parent.remove_tree()
    except OSError as exc:  # best effort: the original error matters more
        say(f"could not remove the failed run's folder {run_dir(cfg)} ({exc})")
