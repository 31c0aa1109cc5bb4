"""The one command line: ``byol-ray <subcommand>``; subcommands parse and dispatch, nothing more."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from byol_ray.errors import ConfigError, NoSpaceError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_DECLINED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 143  # SIGTERM: 128 + 15, as a shell reports it
# Bad input: one line on stderr, exit 2, no traceback. Anything else is a bug and keeps its traceback.
BAD_INPUT = (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
             NoSpaceError)

EPILOG = """\
exit codes:
  0    success
  1    failure: an unexpected error (a bug; its traceback is printed)
  2    bad input: a wrong flag, config key or value, a missing or unreadable file, an unusable
       tracking store (one line on stderr: byol-ray <command>: error: <message>)
  3    promote declined to move the alias (the candidate does not beat the holder)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM: timeout, docker stop, Kubernetes); the MLflow run is marked KILLED

settings: a config key is written key.sub=value after the flags, the same in every command
(mlflow.tracking_uri=URI, mlflow.experiment=NAME, ray.storage_path=PATH, ...); with
mlflow.tracking_uri unset, $MLFLOW_TRACKING_URI wins over the local sqlite store.
output: --json prints the command's result as one JSON document on stdout; progress and
messages always go to stderr."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``argparse.ArgumentDefaultsHelpFormatter`` without the noise: no "(default: None/False/'')"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None or default is False
                or default == "" or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """byol-ray's parsers (subcommands too): defaults and exit codes in --help, usage errors in one line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("epilog", EPILOG)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("byol-ray")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _config_args(p: argparse.ArgumentParser, default_config: str | None = "demo") -> None:
    p.add_argument("--config", "-c", action="append", default=None,
                   help=f"YAML file or preset name, repeatable, applied in order (default: {default_config})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.epochs=5 mlflow.tracking_uri=http://host:5000")


def _load(args, default_config: str = "demo"):
    from byol_ray.config import load_config
    from byol_ray.run_folder import resolve_paths

    return resolve_paths(load_config(args.config or [default_config], args.overrides))


def cmd_train(args) -> int:
    from byol_ray.config import check_run_name, load_config
    from byol_ray.resume import resume_config

    if args.resume:
        # the saved config is the run's recipe: a --config file or a new name would be dropped without a word
        if args.config:
            raise ConfigError(f"--resume {args.resume} continues the run with its saved config.yaml; --config "
                              f"{' '.join(args.config)} cannot change it: drop --config, or start a new run "
                              "(run_name=...) from the file")
        if any(o.partition("=")[0].strip() == "run_name" for o in args.overrides):
            raise ConfigError(f"--resume {args.resume} names the run already; drop run_name=... (a new name is a "
                              "new run: start it without --resume)")
    cfg = load_config(args.config or ["demo"], args.overrides)  # the launchers resolve paths after their checks
    if args.resume:
        check_run_name(args.resume, "--resume")
        cfg = resume_config(cfg.output_dir, args.resume, args.overrides)
    if args.no_ray:
        from byol_ray.train import train_local

        outcome = train_local(cfg, resume=bool(args.resume))
    else:
        from byol_ray.ray_train import launch

        outcome = launch(cfg, resume=bool(args.resume))
    args.result = outcome.as_dict()
    return 0


def cmd_train_result(args) -> tuple[int, dict | None]:
    """``train``: :func:`cmd_train`, whose run outcome (name, folder, MLflow run, registered version,
    final metrics) it leaves in ``args.result``."""
    code = cmd_train(args)
    return code, getattr(args, "result", None)


def cmd_prepare(args) -> tuple[int, dict]:
    from byol_ray.data.prepare import prepare

    result = prepare(
        args.source, args.output, split=args.split, max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
        num_workers=args.num_workers, label_fraction=args.label_fraction, label_subset=args.label_subset,
        val_fraction=args.val_fraction,
        seed=args.seed, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(f"[byol-ray] {result}", file=sys.stderr)
    return EXIT_OK, dataclasses.asdict(result)


def cmd_config(args) -> tuple[int, dict | None]:
    import yaml

    from byol_ray.config import to_dict

    resolved = to_dict(_load(args))
    if args.json:
        return EXIT_OK, resolved
    print(yaml.safe_dump(resolved, sort_keys=False), end="")  # the YAML is this command's result
    return EXIT_OK, None


def cmd_tune(args) -> tuple[int, dict | list]:
    from byol_ray.tune import describe_searches, run_search

    if args.list:
        searches = describe_searches()
        if not args.json:
            for item in searches:
                print(f"{item['name']:<20} {item['about']}")
        return EXIT_OK, searches
    if not args.search or not args.search_name:
        raise ConfigError("byol-ray tune needs --search NAME_OR_FILE and --search-name NAME (or --list)")
    from byol_ray.config import check_run_name

    check_run_name(args.search_name, "--search-name")
    summary = run_search(args.search, name=args.search_name, overrides=args.overrides, resume=args.resume)
    return EXIT_OK, summary


def cmd_spot_watch(args) -> tuple[int, dict]:
    from byol_ray import spot_watch

    if args.drain_now:
        return EXIT_OK, spot_watch.drain_now(address=args.address, node_id=args.node_id, deadline_s=args.deadline_s,
                                            reason=args.reason)
    if not args.cloud:
        raise ConfigError("byol-ray spot-watch needs --cloud aws|gcp (poll that cloud's metadata) or --drain-now "
                          "(a Kubernetes preStop hook)")
    return EXIT_OK, spot_watch.run(cloud=args.cloud, address=args.address, node_id=args.node_id, poll_s=args.poll_s,
                                   metadata_url=args.metadata_url, rebalance=args.rebalance)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="byol-ray", description="BYOL self-supervised training on Ray.")
    parser.add_argument("--version", action="version", version=f"byol-ray {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an encoder (default: the CPU demo preset on built-in data)")
    _config_args(p)
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (one device)")
    p.add_argument("--verbose", action="store_true", help="also show Ray Train's own per-report log lines")
    p.add_argument("--resume", metavar="RUN_NAME", help="continue an interrupted run from its latest checkpoint")
    p.set_defaults(func=cmd_train_result)

    p = sub.add_parser("prepare", help="convert images (ImageFolder, CIFAR folder, 'demo') into an FFCV .beton")
    p.add_argument("source", help="ImageFolder split folder, CIFAR python folder, or 'demo'")
    p.add_argument("output", help="the .beton file to write")
    p.add_argument("--split", default="train", help="split of a CIFAR folder (train/test); 'demo' has only train")
    p.add_argument("--max-resolution", type=int, default=None, help="longest stored side in pixels (default: as is)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the images stored as JPEG")
    p.add_argument("--compress-probability", type=float, default=None,
                   help="share stored as JPEG, the rest raw (default: raw up to ~96 px, JPEG above)")
    p.add_argument("--num-workers", type=int, default=2, help="writer processes")
    p.add_argument("--label-fraction", type=float, default=None,
                   help="keep a class-balanced label subset, e.g. 0.01 (default: all images)")
    p.add_argument("--label-subset", metavar="FILE", default=None,
                   help="keep the images a list file names, one file name per line (the standard ImageNet "
                        "1%%/10%% subset lists); instead of --label-fraction")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="class-balanced share held out into <stem>.val.beton")
    p.add_argument("--seed", type=int, default=0,
                   help="this command's own seed: which images the label subset and the held-out share take")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("tune", help="search lr, tau, weight decay (any config key) with Ray Tune")
    p.add_argument("--search", metavar="NAME_OR_FILE",
                   help="a search-space YAML file, or the name of one shipped with byol-ray: "
                        + ", ".join(sorted(f.stem for f in (Path(__file__).parent / "tune_configs").glob("*.yaml"))))
    p.add_argument("--search-name",
                   help="the search's name: its folder under ray.storage_path and its MLflow parent run")
    p.add_argument("--list", action="store_true", help="list the shipped search files and exit")
    p.add_argument("--resume", action="store_true", help="restore an interrupted search; finished trials stay")
    p.add_argument("--verbose", action="store_true", help="also show Tune's per-trial tables and Ray's log lines")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="trial config overrides, e.g. ray.storage_path=/mnt/shared/byol-ray")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("config", help="print the resolved config (YAML; --json: JSON)")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("spot-watch", help="on a worker node: turn the cloud's spot interruption notice into a Ray "
                                          "drain (reason PREEMPTION), so that the run checkpoints at once")
    p.add_argument("--cloud", choices=("aws", "gcp"),
                   help="poll this cloud's instance metadata (AWS IMDSv2 spot/instance-action and rebalance "
                        "recommendation; GCP instance/preempted)")
    p.add_argument("--drain-now", action="store_true",
                   help="drain this node now and wait until it has left the cluster (a Kubernetes preStop hook)")
    p.add_argument("--deadline-s", type=float, default=100.0,
                   help="with --drain-now: the drain's deadline, and the longest wait (keep it under the pod's "
                        "terminationGracePeriodSeconds)")
    p.add_argument("--reason", default="pod stopping", help="with --drain-now: the drain's reason message")
    p.add_argument("--address", default=None,
                   help="the cluster's GCS address HOST:PORT (default: $RAY_ADDRESS, else the cluster this host's "
                        "Ray node belongs to)")
    p.add_argument("--node-id", default=None, help="the Ray node to drain (hex; default: the worker node on this host)")
    p.add_argument("--poll-s", type=float, default=1.0, help="seconds between metadata polls")
    p.add_argument("--metadata-url", default=None,
                   help="the metadata service's base URL (default: the cloud's, http://169.254.169.254 or "
                        "http://metadata.google.internal)")
    p.add_argument("--rebalance", choices=("log", "drain"), default="log",
                   help="AWS rebalance recommendation (early warning, no deadline): log it, or drain at once")
    p.set_defaults(func=cmd_spot_watch)

    from byol_ray.downstream.cli import register as register_downstream

    register_downstream(sub)  # linear-eval, finetune, knn, promote, register
    for command in sub.choices.values():  # one flag, one meaning, in every command
        command.add_argument("--json", action="store_true",
                             help="print the result as one JSON document on stdout (messages go to stderr)")
    return parser


# ----------------------------------------------------------------------------- running a command


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    """While active, everything written to stdout (ours, libraries', child processes') goes to stderr,
    so that stdout carries only the result."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved_stream, saved_fd = sys.stdout, None
    with contextlib.suppress(OSError):
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stdout = saved_stream
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: paths and objects as text, non-finite floats as null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    return str(obj)


def _run(args) -> tuple[int, Any]:
    outcome = args.func(args)
    if isinstance(outcome, tuple):
        return outcome
    return (outcome if isinstance(outcome, int) else EXIT_OK), None


def main(argv: list[str] | None = None) -> int:
    """``byol-ray``: parse, dispatch, map the outcome to an exit code (see ``EPILOG``)."""
    args, unknown = build_parser().parse_known_args(argv)
    prefix = f"byol-ray {args.command}"
    if unknown:  # said here, not by argparse, so that the line names the command
        print(f"{prefix}: error: unrecognized arguments: {' '.join(unknown)} (key.sub=value settings go after "
              f"the flags; see {prefix} --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    from byol_ray.progress import VERBOSE_ENV
    from byol_ray.ray_connect import quiet_ray_console

    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # read by the Ray launcher and its workers
    quiet_ray_console()  # first thing, before any command imports Ray (`tune` does at import): Ray reads it then
    try:
        with _stdout_to_stderr(args.json):
            code, result = _run(args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        if exc.code == EXIT_TERMINATED:  # SIGTERM, turned into SystemExit(143) by the launchers
            print(f"{prefix}: terminated (SIGTERM)", file=sys.stderr)
        raise
    except BAD_INPUT as exc:
        print(f"{prefix}: error: {_one_line(exc) or type(exc).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - a bug: keep the traceback, say so in one last line
        traceback.print_exc()
        print(f"{prefix}: failed: {type(exc).__name__}: {_one_line(exc)} (an unexpected error; the traceback "
              f"above shows where)", file=sys.stderr)
        return EXIT_FAILURE
    if args.json and result is not None:
        print(json.dumps(_jsonable(result), allow_nan=False))
    return code


if __name__ == "__main__":
    sys.exit(main())
