"""Held-out validation of a checkpoint: kNN top-1 of its online encoder on ``data.val``, off the training path.

Ray Train runs :func:`validate_state` in a task of its own (``ValidationConfig``, ``eval.cpus`` CPUs) on the
checkpoint of every ``eval.every_epochs``-th epoch end while the workers train on. The memory bank is a
seeded subset of the training images (``eval.bank_size``; class-stratified from a folder, uniform from a
.beton) and of the held-out ones (``eval.val_size``), both under the
evaluation transform every registered encoder documents (:mod:`byol_ray.preprocess`). The result goes to
three places: the Ray result (the checkpoint's metrics), the run's MLflow run at the checkpoint's global
step, and ``<run folder>/validation.jsonl`` (which Tune trials read to report it).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from byol_ray.config import Config, ConfigError, from_dict
from byol_ray.storage import Location, is_uri, location

VALIDATION_FILE = "validation.jsonl"
METRIC = "val_knn_top1"


def check_val(cfg: Config) -> None:
    """Fail before training when ``data.val`` is set but cannot be read (or has no labels to score)."""
    if not cfg.data.val:
        return
    if is_uri(cfg.data.val):  # staged on the node that validates; here only its header is read
        from byol_ray.data.check import check_remote_beton

        check_remote_beton(cfg.data.val, "data.val")
    else:
        from byol_ray.evaluation.data import open_split

        split = open_split(cfg.data.val, "test")
        if split.backend == "ffcv":  # readable and complete, not just present
            from byol_ray.data.check import validate_beton

            try:
                validate_beton(split.data)
            except ConfigError as exc:
                raise ConfigError(f"data.val={cfg.data.val!r}: {exc}") from None
        elif len(split.source) == 0:
            raise ConfigError(f"data.val={cfg.data.val!r} holds no images; point it at a labelled held-out split")
    train, val = class_names(cfg.data.train), class_names(cfg.data.val)
    if train is not None and val is not None and train != val:
        only_val, only_train = sorted(set(val) - set(train)), sorted(set(train) - set(val))
        raise ConfigError(f"data.val={cfg.data.val!r} has other classes than data.train (kNN scores by label index, "
                          f"so the result would be meaningless): {len(val)} vs {len(train)} classes"
                          f"{f', only in data.val: {only_val[:5]}' if only_val else ''}"
                          f"{f', only in data.train: {only_train[:5]}' if only_train else ''}"
                          f"{'' if only_val or only_train else ' (same names, another order)'}; point data.val at the "
                          "held-out split of the same data set (byol-ray prepare --val-fraction writes one)")


def class_names(spec: str) -> list[str] | None:
    """The class names a data source labels with, when they can be known cheaply (None: unknown).

    An ImageFolder's class folders (sorted, as its labels are numbered); a .beton's from the ``.json`` that
    ``byol-ray prepare`` wrote beside it (for ``<stem>.val.beton``, the training file's ``<stem>.beton.json``).
    """
    if spec == "demo":
        return None
    where = Location(spec)
    try:
        if where.name.endswith(".beton"):
            candidates = [where.parent / f"{where.name}.json"]
            if where.name.endswith(".val.beton"):
                candidates.append(where.parent / f"{where.name.removesuffix('.val.beton')}.beton.json")
            for sidecar in candidates:
                if sidecar.is_file():
                    return json.loads(sidecar.read_text()).get("class_names")
            return None
        if where.remote or not Path(spec).is_dir():
            return None
        from byol_ray.data.sources import SPLIT_NAMES, cifar_folder

        root = Path(spec)
        if cifar_folder(root) is not None:
            return None
        subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if subdirs and set(subdirs) <= set(SPLIT_NAMES):
            return None  # a folder of split folders: which split trains is the loader's business
        return subdirs or None
    except (OSError, ValueError):
        return None


def _limited(split, size: int, seed: int, what: str):
    """At most ``size`` images of ``split`` (0: all): class-stratified from a folder, uniform from a .beton."""
    import dataclasses

    from byol_ray.evaluation.data import label_subset

    if split.backend == "ffcv":
        from byol_ray.data.check import validate_beton

        total = validate_beton(split.data)["num_samples"]
        if not size or total <= size:
            return split
        picked = np.sort(np.random.default_rng([seed, 0x76616C]).choice(total, size, replace=False))
        return dataclasses.replace(split, indices=picked, description=f"{split.description} [{size} {what}]")
    if not size or len(split.source) <= size:
        return split
    positions = label_subset(np.asarray(split.source.labels), size / len(split.source), seed)
    return split.subset(positions, f"{len(positions)} {what}, seed {seed}")


def validate_state(state: dict[str, Any], *, device: str = "auto") -> dict[str, float]:
    """kNN top-1 of ``state``'s online encoder on the held-out split (the config travels in the state), on
    ``device`` (:func:`byol_ray.device.pick_device`: CUDA when the task has one).

    Returns:
        ``val_knn_top1`` with the checkpoint's ``val_step``/``val_epoch`` and the task's ``val_time_s``.
    """
    from byol_ray.evaluation.data import LoaderSettings, open_split
    from byol_ray.evaluation.knn import knn_eval
    from byol_ray.registry import encoder_from_checkpoint

    from byol_ray.device import pick_device

    start = time.perf_counter()
    cfg = from_dict(state["config"])
    settings = LoaderSettings(resolution=cfg.data.resolution, batch_size=cfg.eval.batch_size, num_workers=0,
                              device=str(pick_device(device)))
    encoder = encoder_from_checkpoint(state)
    bank = _limited(open_split(cfg.data.train, "train", cache_dir=cfg.data.cache_dir, key="data.train"),
                    cfg.eval.bank_size, cfg.train.seed, "kNN bank images")
    held_out = _limited(open_split(cfg.data.val, "test", cache_dir=cfg.data.cache_dir, key="data.val"),
                        cfg.eval.val_size, cfg.train.seed, "held-out images")
    result = knn_eval(encoder, bank, held_out, settings, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    return {METRIC: result["knn_top1"], "val_step": int(state["step"]), "val_epoch": int(state["epoch"]),
            "val_time_s": time.perf_counter() - start, "val_bank_size": int(result["num_train"]),
            "val_size": int(result["num_test"])}


def record(cfg: Config, metrics: dict[str, float], run_id: str | None) -> None:
    """Append ``metrics`` to the run's validation.jsonl and log them into its MLflow run at their step."""
    (Location(cfg.output_dir) / cfg.run_name / VALIDATION_FILE).append_line(json.dumps(metrics))
    if not (cfg.mlflow.enabled and run_id):
        return
    from byol_ray.mlflow_store import client, resolve_tracking_uri

    mlflow = client(resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir))
    step = int(metrics["val_step"])
    timestamp = int(time.time() * 1000)
    from mlflow.entities import Metric

    mlflow.log_batch(run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()
                                      if k not in ("val_step",)])


def latest(run_folder: str | Path | Location) -> dict[str, float] | None:
    """The newest validation recorded for a run (by step), or None."""
    path = location(run_folder) / VALIDATION_FILE
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max(rows, key=lambda r: r.get("val_step", 0)) if rows else None
