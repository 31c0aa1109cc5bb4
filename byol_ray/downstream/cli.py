"""Subcommands ``linear-eval``, ``finetune``, ``knn``, ``promote``, ``register``: parse, dispatch, report.

Each command returns ``(exit code, result)``; ``byol-ray`` prints the result with ``--json`` and maps errors
to exit codes. Human text goes to stderr.
"""
from __future__ import annotations

import argparse
import difflib
import sys

from byol_ray.config import ConfigError

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


def _say(message: str) -> None:
    print(f"[byol-ray] {message}", file=sys.stderr, flush=True)


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


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="models:/<name>@<alias>, models:/<name>/<version>, <name>@<alias> or <name>:<version>")
    p.add_argument("--expect-arch", default=None, help="fail unless the version's architecture tag is this")


def _job_args(p: argparse.ArgumentParser, epochs: int | None) -> None:
    _model_args(p)
    p.add_argument("--train", default="demo", help="'demo', an ImageFolder split folder, a CIFAR folder or a .beton")
    p.add_argument("--test", default=None,
                   help="test data (same kinds); omitted or equal to --train: a seeded --test-fraction holdout of it")
    p.add_argument("--train-split", default="train", help="split inside a CIFAR folder / a folder of split folders")
    p.add_argument("--test-split", default="test", help="split inside a CIFAR folder / a folder of split folders")
    p.add_argument("--test-fraction", type=float, default=0.2, help="holdout share when the test split is made")
    p.add_argument("--loader", choices=("auto", "ffcv", "torch"), default="auto", help="auto: ffcv for .beton")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model card's)")
    p.add_argument("--center-crop-ratio", type=float, default=224 / 256,
                   help="eval centre crop / shorter side (224/256; 1.0 keeps whole small images)")
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

    p = subparsers.add_parser("knn", help="weighted kNN evaluation of a registered encoder (tags knn_top1)")
    _job_args(p, epochs=None)
    p.add_argument("--k", type=int, default=200, help="neighbours that vote")
    p.add_argument("--temperature", type=float, default=0.1, help="T of the exp(similarity / T) vote weights")
    p.set_defaults(func=cmd_knn)

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
    import torch

    from byol_ray.downstream.data import LoaderSettings, open_splits
    from byol_ray.downstream.record import JobRecord
    from byol_ray.registry import load_encoder

    cfg = _settings(args, JOB_KEYS)
    experiment = cfg.mlflow.experiment if _given(args, "mlflow.experiment") else DEFAULT_EXPERIMENT
    uri = _store(cfg)
    encoder, info = load_encoder(args.model, tracking_uri=uri, expect_arch=args.expect_arch)
    train, test, note = open_splits(args.train, args.test, loader=args.loader, train_split=args.train_split,
                                    test_split=args.test_split, test_fraction=args.test_fraction, seed=args.seed)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    settings = LoaderSettings(resolution=args.resolution or info.resolution or 224, batch_size=args.batch_size,
                              num_workers=args.num_workers, device=device, center_crop_ratio=args.center_crop_ratio)
    data = {"train": train.description, "test": test.description, "test_note": note,
            "train_sha256": train.fingerprint().get("sha256", ""), "test_sha256": test.fingerprint().get("sha256", "")}
    params = {**params, "model": args.model, "train": args.train, "test": args.test or "", "loader": args.loader,
              "resolution": settings.resolution, "batch_size": args.batch_size, "seed": args.seed,
              "center_crop_ratio": args.center_crop_ratio, "device": device}
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
    from byol_ray.downstream.knn import knn_eval

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
