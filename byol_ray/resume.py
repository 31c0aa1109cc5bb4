"""The rules of ``--resume``: which run, which checkpoint, and what an override may change."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import yaml

from byol_ray.config import Config, ConfigError, from_dict, to_dict, with_values
from byol_ray.progress import say
from byol_ray.run_folder import (CONFIG_FILE, checkpoint_dir, checkpoints_newest_first, latest_checkpoint, run_dir,
                                 run_exists, saved_config)
from byol_ray.storage import Location, location

# Settings that --resume may change: how the run is executed, never what it computes.
# The group size is one of them: the global batches, crops, augmentations and schedules do not depend on it.
RESUMABLE_KEYS = ("data.num_workers", "data.cache_dir", "data.val", "train.log_every_steps",
                  "train.checkpoint_every_epochs", "train.checkpoint_every_steps", "train.interruptions_per_node_hour",
                  "train.device", "train.compile", "ray.address",
                  "ray.num_workers", "ray.min_workers", "ray.cpus_per_worker", "ray.torch_threads", "ray.max_failures", "ray.num_to_keep",
                  "ray.preemption_poll_steps", "ray.wait_for_workers_s", "ray.checkpoint_upload", "ray.resize_check_s",
                  "eval.every_epochs",
                  "eval.cpus", "eval.knn_k", "eval.knn_temperature", "eval.bank_size", "eval.val_size",
                  "eval.batch_size",
                  "mlflow.register_name", "mlflow.system_metrics_every_s")


def check_new_or_resume(cfg: Config, resume: bool) -> None:
    """Refuse to start over an existing run (nothing already written is overwritten) or to resume none."""
    exists = run_exists(cfg)
    if exists and not resume:
        raise ConfigError(f"a run named {cfg.run_name!r} already exists in {cfg.output_dir}; use --resume "
                          f"{cfg.run_name} to continue it, or choose another run_name=...")
    if resume and not exists:
        raise ConfigError(f"cannot resume {cfg.run_name!r}: nothing of it in {run_dir(cfg)}; check the run name "
                          f"and output_dir={cfg.output_dir}")


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
    saved = saved_config(output_dir, name)
    if saved is None:
        raise ConfigError(f"cannot resume {name!r}: {Location(output_dir) / name / CONFIG_FILE} not found; check "
                          f"--resume and output_dir={output_dir}")
    base = dataclasses.replace(from_dict(saved), run_name=name)
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


def load_resume_state(cfg: Config, map_location: Any, restored: "str | Path | None" = None,
                      restored_name: str = "", *, announce: bool = True) -> dict[str, Any]:
    """The state a resumed run continues from: ``restored`` (the checkpoint folder Ray Train hands back) or the
    run's newest checkpoint (``restored_name``: the name of Ray's folder in the storage, ``epoch_NNNN...``; Ray
    may hand back a local copy under another name). One that cannot be read (truncated by a crash, a full disk
    or a bad copy) is skipped for the next newest intact one, and said so (``announce``: by this process; the
    other ranks of a group stay quiet); a run with checkpoints never silently trains from scratch.

    Raises:
        ConfigError: when no checkpoint of the run can be read (naming each and why).
    """
    from byol_ray.checkpoint import load_checkpoint

    tell = say if announce else (lambda _: None)
    failed: list[str] = []
    if restored is not None:
        try:
            return load_checkpoint(restored, map_location=map_location)
        except ConfigError as exc:
            failed.append(str(exc))
            tell(f"{exc}; falling back to the newest intact checkpoint")
    below = (restored_name or Path(str(restored)).name) if restored is not None else None
    state = _newest_intact(cfg, map_location, failed, tell, below=below)
    if state is None:
        raise ConfigError(f"cannot resume {cfg.run_name!r}: no checkpoint in {checkpoint_dir(cfg)} can be read ("
                          + "; ".join(failed) + "); start a new run (run_name=...)")
    return state


def unrecorded_resume_state(cfg: Config, map_location: Any, *, announce: bool = True) -> dict[str, Any] | None:
    """The state a Ray Train attempt continues from when Ray hands back no checkpoint although the run folder
    holds some: its controller was stopped (Ctrl-C, a stopped job) between a checkpoint's upload and its
    registration. From step 0, the run would overwrite them. The newest intact one is taken; when none can be read
    (a copy cut short, as Ray never finished recording it), the run starts from step 0, as Ray Train would, and
    says so.

    Returns:
        The state, or None (no checkpoint state.pt in the run folder, or none readable).
    """
    tell = say if announce else (lambda _: None)
    failed: list[str] = []
    state = _newest_intact(cfg, map_location, failed, tell)
    if state is None and not failed:  # no checkpoint file at all: a run's first attempt
        return None
    if state is None:
        tell(f"Ray Train recorded no checkpoint of {cfg.run_name}, and none in {checkpoint_dir(cfg)} can be read ("
             + "; ".join(failed) + "): starting it from step 0")
        return None
    tell(f"Ray Train recorded no checkpoint of {cfg.run_name} (it was stopped before registering one): resuming "
         f"from epoch {state['epoch']}, step {state['step']}, the newest intact checkpoint in {checkpoint_dir(cfg)}")
    return state


def _newest_intact(cfg: Config, map_location: Any, failed: list[str], tell, *,
                   below: str | None = None) -> dict[str, Any] | None:
    """The newest readable checkpoint state of the run (older than the folder named ``below``, when given: Ray's
    own, and any newer that Ray did not register as complete), or None; each unreadable one is added to ``failed``."""
    from byol_ray.checkpoint import CHECKPOINT_NAME, load_checkpoint

    for folder in checkpoints_newest_first(cfg):
        if below is not None and folder.name >= below:
            continue
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
            tell(f"{exc}; trying the one before it")
            continue
        if failed:
            tell(f"resuming {cfg.run_name} from {folder.name}, its newest intact checkpoint")
        return state
    return None
