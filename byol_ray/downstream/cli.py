"""Subcommands ``linear-eval``, ``finetune``, ``knn``, ``embed``, ``serve``, ``promote``, ``register``: parse, dispatch,
report.

Each command returns ``(exit code, result)``; ``byol-ray`` prints the result with ``--json`` and maps errors
to exit codes. Human text goes to stderr.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os

from byol_ray.errors import ConfigError
from byol_ray.progress import say as _say

DEFAULT_EXPERIMENT = "byol-ray-downstream"
EXIT_DECLINED = 3  # promote kept the alias where it was (see byol-ray --help)

# The config keys each command takes as key=value after its flags, spelled as `byol-ray train` spells them.
JOB_KEYS = ("mlflow.tracking_uri", "mlflow.experiment", "output_dir")
PROMOTE_KEYS = ("mlflow.tracking_uri", "output_dir")
REGISTER_KEYS = ("mlflow.tracking_uri", "mlflow.register_name")
_KEY_HELP = {
    "mlflow.tracking_uri": "the MLflow store and registry ('' = $MLFLOW_TRACKING_URI, else "
                           "sqlite:///<abs output_dir>/mlflow.db, the default of `byol-ray train`)",
    "mlflow.experiment": f"the MLflow experiment of the job's run (default: {DEFAULT_EXPERIMENT})",
    "output_dir": "where the default store lives (default: runs)",
    "mlflow.register_name": "the registered model name (default: the checkpoint's own mlflow.register_name)",
}


def _settings_args(p: argparse.ArgumentParser, keys: tuple[str, ...]) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="; ".join(f"{key}=: {_KEY_HELP[key]}" for key in keys))


def _settings(args, keys: tuple[str, ...]):
    """The config keys given after the flags (only ``keys`` are accepted), typed as ``byol-ray train`` types them."""
    from byol_ray.config import load_config

    for item in args.overrides:
        key, sep, _ = item.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean {close[0]}=...? " if close and sep else ""
            raise ConfigError(f"{item!r} is not a setting of `byol-ray {args.command}`; {hint}it takes "
                              f"{', '.join(k + '=...' for k in keys)} after its flags")
    return load_config([], args.overrides)


def _given(args, key: str) -> bool:
    return any(item.partition("=")[0].strip() == key for item in args.overrides)


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="models:/<name>@<alias>, models:/<name>/<version>, <name>@<alias> or <name>:<version>"
                        + ("" if required else " (optional when --train and --test are `byol-ray embed` outputs)"))
    p.add_argument("--expect-arch", default=None, help="fail unless the version's architecture tag is this")


def _job_args(p: argparse.ArgumentParser, epochs: int | None) -> None:
    _model_args(p, required=epochs is not None)
    p.add_argument("--train", default="demo", help="'demo', an ImageFolder split folder, a CIFAR folder or a .beton")
    p.add_argument("--test", default=None,
                   help="test data (same kinds); omitted or equal to --train: a seeded --test-fraction holdout of it")
    p.add_argument("--train-split", default="train", help="split inside a CIFAR folder / a folder of split folders")
    p.add_argument("--test-split", default="test", help="split inside a CIFAR folder / a folder of split folders")
    p.add_argument("--test-fraction", type=float, default=0.2, help="holdout share when the test split is made")
    p.add_argument("--loader", choices=("auto", "ffcv", "torch"), default="auto", help="auto: ffcv for .beton")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model card's)")
    p.add_argument("--center-crop-ratio", type=float, default=None,
                   help="eval centre crop / shorter side (default: the paper's 224/256; 1.0 keeps whole small images)")
    p.add_argument("--batch-size", type=int, default=256, help="B; learning rates scale by B/256")
    if epochs is not None:
        p.add_argument("--epochs", type=int, default=epochs, help="epochs of this job")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader processes (torch) or threads (ffcv)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--seed", type=int, default=0,
                   help="this job's own seed: the holdout split, the label subset, the head's initialisation")
    _settings_args(p, JOB_KEYS)


def register(subparsers) -> None:
    """Add the downstream and registry subcommands to ``byol-ray``'s subparsers.

    Args:
        subparsers: the object ``argparse.ArgumentParser.add_subparsers`` returned.
    """
    p = subparsers.add_parser("linear-eval", help="linear evaluation of a registered encoder (tags linear_top1/5)")
    _job_args(p, epochs=80)
    p.add_argument("--lrs", default="0.4,0.3,0.2,0.1,0.05", help="base lrs swept (x B/256), comma separated")
    p.add_argument("--val-fraction", type=float, default=0.1, help="training share held out to pick the lr")
    p.add_argument("--augment", action="store_true",
                   help="the paper's random-resized-crop + flip while training (default: centre-crop features)")
    p.set_defaults(func=cmd_linear_eval)

    p = subparsers.add_parser("finetune", help="fine-tune a registered encoder + linear head (tags finetune_top1)")
    _job_args(p, epochs=30)
    p.add_argument("--lr", type=float, default=0.05, help="base lr (x B/256)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of encoder and head")
    p.add_argument("--label-fraction", type=float, default=None,
                   help="class-balanced label subset, e.g. 0.01, 0.1 (default: all labels)")
    p.set_defaults(func=cmd_finetune)

    p = subparsers.add_parser("knn", help="weighted kNN evaluation of a registered encoder (tags knn_top1); "
                                          "--train/--test may be two `byol-ray embed` outputs (no re-encoding)")
    _job_args(p, epochs=None)
    p.add_argument("--k", type=int, default=200, help="neighbours that vote")
    p.add_argument("--temperature", type=float, default=0.1, help="T of the exp(similarity / T) vote weights")
    p.set_defaults(func=cmd_knn)

    p = subparsers.add_parser("embed", help="embeddings of an image set on Ray Data, as Parquet shards (restartable)")
    _model_args(p)
    p.add_argument("--data", required=True, help="an image folder (any depth; first-level folders are the classes "
                                                 "when every image is inside one), a prepared .beton, or an "
                                                 "object-store prefix (s3://bucket/images/)")
    p.add_argument("--out", required=True, help="a new or empty folder / object-store prefix for the shards; the "
                                                "same command again continues an unfinished one")
    p.add_argument("--labels", choices=("auto", "none"), default="auto",
                   help="auto: a label column from first-level class folders when every image is in one")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder call")
    p.add_argument("--concurrency", type=int, default=1, help="encoder actors (one per GPU on a GPU cluster)")
    p.add_argument("--num-gpus", default="auto", help="GPUs per encoder actor; auto: 1 when the cluster has GPUs")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per encoder actor")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--shard-size", type=int, default=10000, help="rows per Parquet shard (the unit of restart)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model card's)")
    p.add_argument("--center-crop-ratio", type=float, default=None,
                   help="eval centre crop / shorter side (default: the model card's, 224/256)")
    _settings_args(p, JOB_KEYS)
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser("serve", help="serve a registered encoder over HTTP on Ray Serve: clients POST JPEG/PNG "
                                            "bytes or uint8 arrays and get embeddings (Ctrl-C/SIGTERM: exit 0)")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP address of Serve's proxy (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of Serve's proxy")
    p.add_argument("--route", default="/embed", help="route prefix of the application")
    p.add_argument("--app-name", default="byol-ray-encoder", help="the Ray Serve application's name")
    p.add_argument("--replicas", type=int, default=1, help="replicas (the minimum when autoscaling)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    p.add_argument("--max-batch-size", type=int, default=32, help="images encoded together per replica call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill")
    p.add_argument("--num-gpus", default="auto", help="GPUs per replica; auto: 1 when the cluster has GPUs")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per replica")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model card's)")
    p.add_argument("--center-crop-ratio", type=float, default=None,
                   help="eval centre crop / shorter side (default: the model card's, 224/256)")
    p.add_argument("--detach", action="store_true", help="deploy, print the URL and exit, leaving the app running "
                                                         "on the cluster (`serve shutdown` or `serve delete` ends it)")
    _settings_args(p, ("mlflow.tracking_uri", "output_dir"))
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("promote", help="move an alias to a version if its metric beats the holder's "
                                              "(exit 3 when it does not)")
    p.add_argument("--model", required=True, help="the candidate: models:/<name>/<version> or <name>:<version>")
    p.add_argument("--alias", default="champion", help="the alias to move")
    p.add_argument("--metric", default="linear_top1", help="model-version tag compared (written by linear-eval)")
    p.add_argument("--force", action="store_true", help="move the alias whatever the numbers")
    _settings_args(p, PROMOTE_KEYS)
    p.set_defaults(func=cmd_promote)

    p = subparsers.add_parser("register", help="register the online encoder of a checkpoint in the model registry")
    p.add_argument("--checkpoint", required=True,
                   help="a state.pt file or a checkpoint folder, local or in an object store (s3://...); loaded "
                        "with torch.load(weights_only=True): a file that would run code is refused unrun")
    _settings_args(p, REGISTER_KEYS)
    p.set_defaults(func=cmd_register)


# ----------------------------------------------------------------------------- commands


def _store(cfg) -> str:
    """The resolved, checked tracking URI of ``mlflow.tracking_uri`` / ``$MLFLOW_TRACKING_URI`` / the default.
    Every job here reads an encoder someone registered, so a sqlite store must already exist: a mistyped path
    is refused before any folder or empty store is created."""
    from byol_ray.mlflow_store import check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
    check_tracking(uri, must_exist=True)
    return uri


def _run_job(args, job: str, evaluate, params: dict, version_keys: tuple[str, ...]) -> tuple[int, dict]:
    """Pull the encoder, open the splits, run ``evaluate`` inside the job's MLflow run, tag the version."""

    from byol_ray.device import pick_device
    from byol_ray.downstream.record import JobRecord
    from byol_ray.evaluation.data import LoaderSettings, open_splits
    from byol_ray.preprocess import EVAL_CROP_RATIO
    from byol_ray.registry import load_encoder

    cfg = _settings(args, JOB_KEYS)
    experiment = cfg.mlflow.experiment if _given(args, "mlflow.experiment") else DEFAULT_EXPERIMENT
    uri = _store(cfg)
    encoder, info = load_encoder(args.model, tracking_uri=uri, expect_arch=args.expect_arch)
    train, test, note = open_splits(args.train, args.test, loader=args.loader, train_split=args.train_split,
                                    test_split=args.test_split, test_fraction=args.test_fraction, seed=args.seed)
    device = str(pick_device(args.device))
    settings = LoaderSettings(resolution=args.resolution or info.resolution or 224, batch_size=args.batch_size,
                              num_workers=args.num_workers, device=device,
                              center_crop_ratio=args.center_crop_ratio or EVAL_CROP_RATIO)
    data = {"train": train.description, "test": test.description, "test_note": note,
            "train_sha256": train.fingerprint().get("sha256", ""), "test_sha256": test.fingerprint().get("sha256", "")}
    params = {**params, "model": args.model, "train": args.train, "test": args.test or "", "loader": args.loader,
              "resolution": settings.resolution, "batch_size": args.batch_size, "seed": args.seed,
              "center_crop_ratio": settings.center_crop_ratio, "device": device}
    with JobRecord(uri, experiment, job, info, args.model, params, data) as record:
        result = evaluate(encoder, train, test, settings)
        record.finish(result, {k: result[k] for k in version_keys if k in result})
    out = {"job": job, "model": f"{info.name}/{info.version}", "model_name": info.name,
           "model_version": str(info.version), "run_id": record.run_id, "tracking_uri": uri, "test": note, **result}
    scores = ", ".join(f"{k} {result[k]:.4f}" for k in version_keys if isinstance(result.get(k), float))
    _say(f"{job} of models:/{info.name}/{info.version}: {scores or 'done'} (MLflow run {record.run_id} in {uri})")
    return 0, out


def cmd_linear_eval(args) -> tuple[int, dict]:
    from byol_ray.downstream.linear_eval import linear_eval

    lrs = tuple(float(v) for v in args.lrs.split(",") if v.strip())
    if not lrs:
        raise ConfigError("--lrs needs at least one learning rate")

    def evaluate(encoder, train, test, settings):
        result = linear_eval(encoder, train, test, settings, epochs=args.epochs, base_lrs=lrs,
                             val_fraction=args.val_fraction, seed=args.seed, augment=args.augment)
        result["linear_epochs"], result["linear_mode"] = result["epochs"], result["mode"]
        return result

    return _run_job(args, "linear-eval", evaluate,
                    {"epochs": args.epochs, "lrs": args.lrs, "val_fraction": args.val_fraction,
                     "augment": args.augment},
                    ("linear_top1", "linear_top5", "linear_lr", "linear_epochs", "linear_mode"))


def cmd_finetune(args) -> tuple[int, dict]:
    from byol_ray.downstream.finetune import finetune

    def evaluate(encoder, train, test, settings):
        result = finetune(encoder, train, test, settings, epochs=args.epochs, base_lr=args.lr,
                          weight_decay=args.weight_decay, label_fraction=args.label_fraction, seed=args.seed)
        result[f"finetune_top1_labels{result['finetune_label_fraction']:g}"] = result["finetune_top1"]
        return result

    fraction = args.label_fraction or 1.0
    return _run_job(args, "finetune", evaluate,
                    {"epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
                     "label_fraction": fraction},
                    ("finetune_top1", "finetune_top5", "finetune_label_fraction", f"finetune_top1_labels{fraction:g}"))


def cmd_knn(args) -> tuple[int, dict]:
    from byol_ray.downstream.embed import is_embeddings
    from byol_ray.evaluation.knn import knn_eval

    if args.test and (is_embeddings(args.train) or is_embeddings(args.test)):
        return _knn_of_embeddings(args)
    if not args.model:
        raise ConfigError("byol-ray knn needs --model (a registered encoder), unless --train and --test are two "
                          "`byol-ray embed` outputs")

    def evaluate(encoder, train, test, settings):
        return knn_eval(encoder, train, test, settings, k=args.k, temperature=args.temperature)

    return _run_job(args, "knn", evaluate, {"k": args.k, "temperature": args.temperature},
                    ("knn_top1", "knn_k", "knn_temperature"))


def cmd_promote(args) -> tuple[int, dict]:
    """Exit 0 when the candidate holds the alias afterwards, 3 when promotion was declined."""
    from byol_ray.registry import describe, parse_model_uri, promote

    name, alias, version = parse_model_uri(args.model)
    uri = _store(_settings(args, PROMOTE_KEYS))
    if alias is not None or version in (None, "latest"):
        version = describe(args.model, tracking_uri=uri).version  # promote what the reference points to now
    decision = promote(name, version, alias=args.alias, metric=args.metric, force=args.force, tracking_uri=uri)
    if decision["promoted"]:
        _say(f"promoted: {name}@{args.alias} -> v{decision['version']} ({decision['reason']})")
        return 0, decision
    if decision["previous_version"] == decision["version"]:
        _say(f"{name}@{args.alias} already on v{decision['version']} ({decision['reason']})")
        return 0, decision
    _say(f"not promoted: {name}@{args.alias} stays on v{decision['previous_version']} ({decision['reason']})")
    return EXIT_DECLINED, decision


def cmd_register(args) -> tuple[int, dict]:
    from byol_ray.registry import register_from_checkpoint

    cfg = _settings(args, REGISTER_KEYS)
    version = register_from_checkpoint(args.checkpoint, name=cfg.mlflow.register_name if _given(
        args, "mlflow.register_name") else "", tracking_uri=cfg.mlflow.tracking_uri)
    _say(f"registered models:/{version.name}/{version.version} (source {version.source})")
    return 0, {"name": version.name, "version": str(version.version), "model_uri": f"models:/{version.name}/"
               f"{version.version}", "run_id": version.run_id, "source": version.source}


def _knn_of_embeddings(args) -> tuple[int, dict]:
    """kNN from two ``embed`` outputs: the train set is the memory bank; nothing is re-encoded."""
    from byol_ray.downstream.embed import is_embeddings, read_embeddings
    from byol_ray.evaluation.knn import knn_top1
    from byol_ray.downstream.record import JobRecord
    from byol_ray.registry import describe

    for flag, spec in (("--train", args.train), ("--test", args.test)):
        if not is_embeddings(spec):
            raise ConfigError(f"{flag} {spec} is not a `byol-ray embed` output (no manifest.json) while the other "
                              f"split is: pass two embed outputs, or two image sources")
    train_x, train_y, train_m = read_embeddings(args.train)
    test_x, test_y, test_m = read_embeddings(args.test)
    if train_m["model"] != test_m["model"]:
        raise ConfigError(f"--train was embedded by {train_m['model']} and --test by {test_m['model']}: kNN needs "
                          f"one encoder's embeddings on both sides")
    if train_y is None or test_y is None:
        raise ConfigError(f"{args.train if train_y is None else args.test} has no label column (its source had no "
                          f"class folders); kNN needs labels on both sides")
    cfg = _settings(args, JOB_KEYS)
    experiment = cfg.mlflow.experiment if _given(args, "mlflow.experiment") else DEFAULT_EXPERIMENT
    uri = _store(cfg)
    info = describe(train_m["model"], tracking_uri=uri)
    if args.model:
        asked = describe(args.model, tracking_uri=uri)
        if (asked.name, asked.version) != (info.name, info.version):
            raise ConfigError(f"--model {args.model} is models:/{asked.name}/{asked.version}, but the embeddings "
                              f"were made by {train_m['model']}; drop --model or embed with it")
    top1 = knn_top1(train_x, train_y, test_x, test_y, k=args.k, temperature=args.temperature)
    result = {"knn_top1": top1, "knn_k": min(args.k, len(train_y)), "knn_temperature": args.temperature,
              "num_train": len(train_y), "num_test": len(test_y)}
    params = {"model": train_m["model"], "train": args.train, "test": args.test, "k": args.k,
              "temperature": args.temperature, "from_embeddings": True}
    data = {"train": train_m["source"], "test": test_m["source"], "train_sha256": train_m["source_digest"],
            "test_sha256": test_m["source_digest"], "test_note": "separate test split (embeddings)"}
    with JobRecord(uri, experiment, "knn", info, train_m["model"], params, data) as record:
        record.finish(result, {k: result[k] for k in ("knn_top1", "knn_k", "knn_temperature")})
    _say(f"knn of {train_m['model']} from embeddings: knn_top1 {top1:.4f} (MLflow run {record.run_id} in {uri})")
    return 0, {"job": "knn", "model": f"{info.name}/{info.version}", "model_name": info.name,
               "model_version": str(info.version), "run_id": record.run_id, "tracking_uri": uri,
               "test": data["test_note"], **result}


def _eval_settings(args, info) -> tuple[dict, int, float]:
    """(the card's eval transform, resolution, centre-crop ratio): ``--resolution``/``--center-crop-ratio`` when
    given, else the model card's."""
    from byol_ray.preprocess import EVAL_CROP_RATIO

    card = json.loads(info.tags.get("eval_transform") or "{}")
    resolution = args.resolution or info.resolution or 224
    ratio = args.center_crop_ratio or float(card.get("center_crop_ratio", EVAL_CROP_RATIO))
    if not 0 < ratio <= 1:
        raise ConfigError(f"--center-crop-ratio {ratio} must lie in (0, 1]")
    return card, resolution, ratio


def _num_gpus(value: str) -> float:
    if value != "auto":
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"--num-gpus {value!r} is not a number; pass e.g. 1, 0.5 or auto") from None
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def cmd_embed(args) -> tuple[int, dict]:
    """Embed ``--data`` with a registered encoder into ``--out`` (see :mod:`byol_ray.downstream.embed`)."""
    import time

    import torch

    from byol_ray.downstream.embed import (MANIFEST, EmbedSettings, Plan, check_on_every_node, list_images, open_dest,
                                           run_embed, shown, summarise)
    from byol_ray.downstream.record import JobRecord
    from byol_ray.preprocess import to_model_input
    from byol_ray.ray_connect import init_ray
    from byol_ray.registry import load_encoder
    from byol_ray.run_tags import ray_job_submission_id
    from byol_ray.signals import sigterm_raises
    from byol_ray.storage import check_writable, is_uri

    for flag, value in (("--batch-size", args.batch_size), ("--concurrency", args.concurrency),
                        ("--shard-size", args.shard_size)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1")
    cfg = _settings(args, JOB_KEYS)
    experiment = cfg.mlflow.experiment if _given(args, "mlflow.experiment") else DEFAULT_EXPERIMENT
    uri = _store(cfg)
    encoder, info = load_encoder(args.model, tracking_uri=uri, expect_arch=args.expect_arch)
    images = list_images(args.data, args.labels)
    card, resolution, ratio = _eval_settings(args, info)
    plan = Plan(model=info.uri, source=images.root, source_kind=images.kind, source_digest=images.digest,
                num_images=len(images), resolution=resolution, center_crop_ratio=ratio, shard_size=args.shard_size,
                transform={**card, "center_crop_ratio": ratio, "resize_to": [resolution, resolution]},
                class_names=images.class_names)
    if ray_job_submission_id() and not is_uri(args.out) and not os.path.isabs(os.path.expanduser(args.out)):
        raise ConfigError(f"--out {args.out} is a relative path: a Ray job's working directory is a temporary copy "
                          f"that Ray deletes; pass an absolute path on shared storage or an object-store prefix")
    out, manifest, done = open_dest(args.out, plan)
    if manifest is not None:
        plan.shard_size = int(manifest["shard_size"])  # the DEST's own plan, whatever --shard-size says now
        if manifest.get("status") == "complete":
            _say(f"{shown(out)} already holds the complete embeddings of {plan.model} for {plan.source} "
                 f"({manifest['rows']:,} rows); nothing to do")
            return 0, {"job": "embed", "out": shown(out), "already_complete": True, **manifest}
        _say(f"continuing {shown(out)}: {len(done)}/{plan.num_shards} shards already complete")
    check_writable(out, "--out")
    with torch.no_grad():
        dim = int(encoder.eval()(to_model_input(torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8))).shape[1])
    init_ray()
    check_on_every_node(images)
    settings = EmbedSettings(batch_size=args.batch_size, concurrency=args.concurrency, num_gpus=_num_gpus(args.num_gpus),
                             cpus_per_actor=args.cpus_per_actor, precision=args.precision)
    created = manifest is None
    if created:
        (out / MANIFEST).write_text(json.dumps(plan.manifest(status="running", feature_dim=dim), indent=1))
    params = {"model": args.model, "data": args.data, "out": shown(out), "batch_size": args.batch_size,
              "concurrency": args.concurrency, "num_gpus": settings.num_gpus, "precision": args.precision,
              "shard_size": plan.shard_size, "resolution": resolution, "center_crop_ratio": ratio}
    data = {"source": plan.source, "source_sha256": plan.source_digest, "num_images": plan.num_images,
            "dest": shown(out)}
    _say(f"embed {plan.model} over {plan.num_images:,} images of {plan.source} -> {shown(out)} "
         f"({plan.num_shards} shards of {plan.shard_size}; {settings.concurrency} encoder actor(s), "
         f"{settings.num_gpus:g} GPU each)")
    with sigterm_raises(), JobRecord(uri, experiment, "embed", info, args.model, params, data) as record:
        try:
            stats = run_embed(encoder, images, plan, out, done, settings, dim)
        except (KeyboardInterrupt, SystemExit):
            complete = len(open_dest(args.out, plan)[2])
            _say(f"stopped: {complete}/{plan.num_shards} shards of {shown(out)} are complete and kept; the same "
                 f"command continues with the rest")
            raise
        totals = summarise(out, plan)
        if totals["rows"] == 0:
            if created:
                out.remove_tree()
            example = "; ".join(f"{p}: {r}" for p, r in totals["skipped_examples"][:2])
            raise ConfigError(f"--data {plan.source}: none of its {plan.num_images:,} images could be read "
                              f"({example}); nothing was written")
        final = plan.manifest(status="complete", feature_dim=dim, rows=totals["rows"], skipped=totals["skipped"],
                              skipped_examples=totals["skipped_examples"], images_per_s=round(stats["images_per_s"], 2),
                              seconds=round(stats["seconds"], 2), nodes=stats["nodes"], mlflow_run_id=record.run_id,
                              tracking_uri=uri, completed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        (out / MANIFEST).write_text(json.dumps(final, indent=1))
        result = {"embed_rows": totals["rows"], "embed_skipped": totals["skipped"],
                  "embed_images_per_s": round(stats["images_per_s"], 2), "embed_seconds": round(stats["seconds"], 2),
                  "embed_shards_written": stats["shards_written"], "embed_nodes": len(stats["nodes"]),
                  "embed_dest": shown(out)}
        record.finish(result, {k: result[k] for k in ("embed_rows", "embed_images_per_s", "embed_dest")})
    if totals["skipped"]:
        example = "; ".join(f"{p}: {r}" for p, r in totals["skipped_examples"][:3])
        _say(f"skipped {totals['skipped']} unreadable image(s) (listed in {shown(out)}/{MANIFEST}), e.g. {example}")
    _say(f"embedded {totals['rows']:,} images of {plan.source} with {plan.model} into {shown(out)} "
         f"({stats['images_per_s']:,.1f} img/s this run; MLflow run {record.run_id})")
    return 0, {"job": "embed", "out": shown(out), "model": plan.model, "model_name": info.name,
               "model_version": str(info.version), "run_id": record.run_id, "tracking_uri": uri,
               "rows": totals["rows"], "skipped": totals["skipped"], "feature_dim": dim,
               "nodes": stats["nodes"], **result}


def cmd_serve(args) -> tuple[int, dict]:
    """Deploy the encoder as a Ray Serve application; block until Ctrl-C or SIGTERM, then delete it."""
    import signal
    import threading

    from byol_ray.ray_connect import init_ray
    from byol_ray.registry import describe

    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        raise ConfigError(f"--replicas {args.replicas} must be at least 1 and --max-replicas at least --replicas")
    if args.max_batch_size < 1 or args.batch_wait_ms < 0:
        raise ConfigError("--max-batch-size must be at least 1 and --batch-wait-ms at least 0")
    if not args.route.startswith("/"):
        raise ConfigError(f"--route {args.route!r} must start with '/', e.g. /embed")
    uri = _store(_settings(args, ("mlflow.tracking_uri", "output_dir")))
    info = describe(args.model, tracking_uri=uri)  # pinned: replicas load this version even if the alias moves
    if args.expect_arch is not None and info.architecture != args.expect_arch:
        raise ConfigError(f"{args.model} (version {info.version}) is a {info.architecture or 'untagged'} encoder, "
                          f"not the expected {args.expect_arch}")
    _, resolution, ratio = _eval_settings(args, info)
    embedded = not os.environ.get("RAY_ADDRESS")
    init_ray()
    from ray import serve

    from byol_ray.downstream.serve import build_app

    app = build_app(info.uri, uri, resolution=resolution, center_crop_ratio=ratio, precision=args.precision,
                    max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                    num_replicas=args.replicas, max_replicas=args.max_replicas or args.replicas,
                    num_gpus=_num_gpus(args.num_gpus), num_cpus=args.cpus_per_replica)
    from byol_ray.ray_connect import verbose

    quiet = {} if verbose() else {"logging_config": {"log_level": "WARNING"}}  # Serve's INFO behind BYOL_RAY_VERBOSE
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port}, **quiet)
    serve.run(app, name=args.app_name, route_prefix=args.route, blocking=False, **quiet)
    url = f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}{args.route}"
    out = {"job": "serve", "model": info.uri, "model_name": info.name, "model_version": str(info.version),
           "url": url, "app": args.app_name, "resolution": resolution, "center_crop_ratio": ratio}
    _say(f"serving {info.uri} at {url} ({args.replicas}"
         f"{'' if not args.max_replicas or args.max_replicas == args.replicas else f'..{args.max_replicas}'} "
         f"replica(s)); try: curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @image.jpg {url}")
    if args.detach:
        return 0, out
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if embedded:  # the app lives and ends with this process's own Ray
            import ray

            _say("stopping: shutting down the embedded Ray and its Serve application")
            ray.shutdown()
        else:
            _say(f"stopping: deleting Serve application {args.app_name!r} from the cluster")
            serve.delete(args.app_name)
    _say(f"stopped serving {info.uri}")
    return 0, out
