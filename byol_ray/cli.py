"""The one command line: ``byol-ray <subcommand>``; subcommands parse and dispatch, nothing more."""
from __future__ import annotations

import argparse
import sys

from byol_ray.config import ConfigError


def _config_args(p: argparse.ArgumentParser, default_config: str | None = "demo") -> None:
    p.add_argument("--config", "-c", action="append", default=None,
                   help=f"YAML file or preset name, repeatable, applied in order (default: {default_config})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=5")


def _load(args, default_config: str = "demo"):
    from byol_ray.config import load_config
    from byol_ray.run import resolve_paths

    return resolve_paths(load_config(args.config or [default_config], args.overrides))


def cmd_train(args) -> int:
    cfg = _load(args)
    if args.resume:
        cfg = _resume_config(cfg, args.resume)
    if args.no_ray:
        from byol_ray.train import train_local

        train_local(cfg, resume=bool(args.resume))
        return 0
    from byol_ray.ray_train import launch

    launch(cfg, resume=bool(args.resume))
    return 0


def _resume_config(cfg, name: str):
    """Reload the run's own saved config so a resumed run continues the same schedules."""
    import dataclasses
    from pathlib import Path

    import yaml

    from byol_ray.config import from_dict

    saved = Path(cfg.output_dir) / name / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"cannot resume {name!r}: {saved} not found; check --resume and output_dir={cfg.output_dir}")
    resumed = from_dict(yaml.safe_load(saved.read_text()))
    return dataclasses.replace(resumed, run_name=name)


def cmd_prepare(args) -> int:
    from byol_ray.data.prepare import prepare

    result = prepare(
        args.source, args.output, split=args.split, max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
        num_workers=args.workers, label_fraction=args.label_fraction, val_fraction=args.val_fraction,
        seed=args.seed, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(result)
    return 0


def cmd_config(args) -> int:
    import yaml

    from byol_ray.config import to_dict

    print(yaml.safe_dump(to_dict(_load(args)), sort_keys=False), end="")
    return 0


def cmd_tune(args) -> int:
    from byol_ray.tune import run_search

    run_search(args.search, name=args.name, overrides=args.overrides, storage_path=args.storage_path,
               resume=args.resume)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byol-ray", description="BYOL self-supervised training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an encoder (default: the CPU demo preset on built-in data)")
    _config_args(p)
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (one device)")
    p.add_argument("--resume", metavar="RUN_NAME", help="continue an interrupted run from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="convert images (ImageFolder, CIFAR folder, 'demo') into an FFCV .beton")
    p.add_argument("source", help="ImageFolder split folder, CIFAR python folder, or 'demo'")
    p.add_argument("output", help="the .beton file to write")
    p.add_argument("--split", default="train", help="split of a CIFAR folder (train/test); 'demo' has only train")
    p.add_argument("--max-resolution", type=int, default=None, help="longest stored side in pixels")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=None,
                   help="share stored as JPEG, the rest raw (default: raw up to ~96 px, JPEG above)")
    p.add_argument("--workers", type=int, default=2, help="writer processes")
    p.add_argument("--label-fraction", type=float, default=None, help="class-balanced label subset, e.g. 0.01")
    p.add_argument("--val-fraction", type=float, default=0.0, help="held-out validation share")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("tune", help="search lr, tau, weight decay (any config key) with Ray Tune")
    p.add_argument("--search", required=True, help="search-space YAML (see tune_configs/)")
    p.add_argument("--name", required=True, help="search name: folder under the storage path, MLflow parent run")
    p.add_argument("--storage-path", default="", help="default: the trial config's ray.storage_path")
    p.add_argument("--resume", action="store_true", help="restore an interrupted search; finished trials stay")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="trial config overrides")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("config", help="print the resolved config")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    from byol_ray.downstream.cli import register as register_downstream

    register_downstream(sub)  # linear-eval, finetune, knn, promote, register
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as exc:
        print(f"byol-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
