"""Ray Tune edge: search spaces as data, one Ray Train run per trial, BYOL-aware early stopping."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from ray.tune.stopper import Stopper  # this module is the Tune edge: Ray is its dependency

from byol_ray.config import Config, ConfigError, from_dict, load_config, to_dict, with_values
from byol_ray.storage import Location

# metrics every trial reports at each epoch end (engine.fit's epoch metrics; val_knn_top1 with data.val)
REPORTED_METRICS = ("val_knn_top1", "epoch_classifier_acc", "epoch_classifier_loss", "epoch_projection_std",
                    "images_per_s")
# Never a selection metric: the BYOL loss measures how well the online network predicts a target that the
# trial's own τ and learning rate shape (a slower-moving target is easier to predict), so its value is not
# comparable across trials; selecting on it favoured the lowest τ, not the best encoder.
NOT_COMPARABLE = ("epoch_loss", "loss")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")
STOP_REASONS_FILE = "stop_reasons.json"
SEARCHES_DIR = Path(__file__).parent / "tune_configs"  # the repository's tune_configs/, shipped with the package


@dataclass
class SchedulerSpec:
    """ASHA (default) prunes trials whose metric trails at a rung; ``fifo`` runs every trial to the end."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # epochs before a trial can be stopped
    reduction_factor: int = 2


@dataclass
class StopSpec:
    """BYOL-specific stopping: NaN/inf loss always; collapse when projections stop varying."""

    collapse_std: float = 0.01  # healthy l2-normalised projections have std ~ 1/sqrt(projector_dim)
    collapse_patience: int = 2  # consecutive epoch reports below collapse_std


@dataclass
class SearchSpec:
    """A search: the trial config, the space over config keys, the metric, resources and stopping."""

    base_config: list[str] = field(default_factory=lambda: ["demo"])
    overrides: list[str] = field(default_factory=list)
    space: dict[str, dict[str, list]] = field(default_factory=dict)
    # '' = val_knn_top1 when the trials have data.val (held-out kNN), else the online probe's epoch_classifier_acc
    metric: str = ""
    mode: Literal["min", "max"] = "max"
    num_samples: int = 4
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs/GPUs fit
    search_alg: Literal["random", "optuna"] = "random"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    stop: StopSpec = field(default_factory=StopSpec)
    register_best: bool = True  # register the best trial's online encoder (same model card as a training run)
    register_name: str = ""  # '' = "<search name>-encoder" (an explicit mlflow.register_name=... override wins)


def load_search(path: str, extra_overrides: list[str] | tuple[str, ...] = ()) -> tuple[SearchSpec, Config]:
    """Read and check a search file before any trial starts.

    Args:
        path: YAML file (e.g. ``tune_configs/cpu_smoke.yaml``).
        extra_overrides: ``key=value`` overrides applied to the trial config after the file's.

    Returns:
        (spec, the base trial config); raises :class:`ConfigError` naming the problem.
    """
    p = search_file(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"search file {p} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"search file {path} must hold a mapping")
    spec = _build_spec(raw, path)
    spec.overrides = [*spec.overrides, *extra_overrides]
    base = load_config(spec.base_config, spec.overrides)
    if spec.metric in NOT_COMPARABLE:
        raise ConfigError(f"{path}: metric {spec.metric!r} cannot select trials: the BYOL loss depends on each "
                          "trial's own τ and learning rate (a slower target is easier to predict), so it is not "
                          "comparable across trials and would pick the lowest τ, not the best encoder. Use "
                          "val_knn_top1 (set data.val to a labelled held-out split) or epoch_classifier_acc, or "
                          "leave metric unset to get the first of those that the trials report")
    if not spec.metric:
        spec.metric, spec.mode = ("val_knn_top1" if base.data.val else "epoch_classifier_acc"), "max"
    if spec.metric not in REPORTED_METRICS:
        raise ConfigError(f"{path}: metric {spec.metric!r} is not reported by training; "
                          f"choose one of {list(REPORTED_METRICS)}")
    if spec.metric == "val_knn_top1" and not (base.data.val and base.eval.every_epochs):
        raise ConfigError(f"{path}: metric val_knn_top1 needs a held-out split: set data.val=... "
                          "(and eval.every_epochs >= 1)")
    if spec.metric.startswith("epoch_classifier") and not base.model.online_classifier:
        raise ConfigError(f"{path}: metric {spec.metric!r} needs model.online_classifier=true")
    if spec.num_samples < 1 or spec.max_concurrent_trials < 0:
        raise ConfigError(f"{path}: num_samples must be >= 1 and max_concurrent_trials >= 0")
    if spec.scheduler.grace_period < 1 or spec.scheduler.reduction_factor < 2:
        raise ConfigError(f"{path}: scheduler.grace_period must be >= 1 and scheduler.reduction_factor >= 2")
    for key, dist in spec.space.items():
        _check_distribution(path, key, dist, base)
    return spec, base


def search_file(name_or_path: str) -> Path:
    """A search file: a path, or the name of one shipped with byol-ray (``cpu_smoke``, ``cifar10_resnet18``, ...).

    The shipped files are ``tune_configs/`` of the repository, installed with the package, so a name works in the
    runtime image and after ``pip install`` as well as in a checkout.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = SEARCHES_DIR / f"{Path(name_or_path).name.removesuffix('.yaml')}.yaml"
    if shipped.is_file() and (not path.suffix or path.parent.name == "tune_configs"):
        return shipped
    raise ConfigError(f"search file {name_or_path!r} not found; give a YAML path or the name of a shipped search "
                      f"({', '.join(shipped_searches())}; byol-ray tune --list)")


def shipped_searches() -> list[str]:
    """Names of the search files shipped with byol-ray."""
    return sorted(p.stem for p in SEARCHES_DIR.glob("*.yaml"))


def describe_searches() -> list[dict[str, str]]:
    """Name, path and the first comment line of every shipped search file (``byol-ray tune --list``)."""
    out = []
    for name in shipped_searches():
        path = SEARCHES_DIR / f"{name}.yaml"
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        out.append({"name": name, "path": str(path), "about": first})
    return out


def _build_spec(raw: dict, path: str) -> SearchSpec:
    fields = {f.name for f in dataclasses.fields(SearchSpec)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{path}: unknown search key {key!r} (valid: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(SearchSpec)
    for key, value in raw.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            sub = {f.name for f in dataclasses.fields(typ)}
            unknown = set(value or {}) - sub
            if unknown:
                raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} under {key!r} (valid: {sorted(sub)})")
            sub_hints = typing.get_type_hints(typ)
            for sub_key, sub_value in (value or {}).items():
                allowed = typing.get_args(sub_hints[sub_key])
                if typing.get_origin(sub_hints[sub_key]) is Literal and sub_value not in allowed:
                    raise ConfigError(f"{path}: {key}.{sub_key}={sub_value!r}; choose one of {list(allowed)}")
            kwargs[key] = typ(**(value or {}))
        elif typing.get_origin(typ) is Literal and value not in typing.get_args(typ):
            raise ConfigError(f"{path}: {key}={value!r}; choose one of {list(typing.get_args(typ))}")
        else:
            kwargs[key] = value
    return SearchSpec(**kwargs)


def _check_distribution(path: str, key: str, dist: Any, base: Config) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(f"{path}: space.{key} must be one of {{loguniform|uniform|randint: [low, high]}} or "
                          f"{{choice|grid: [values]}}, got {dist!r}")
    kind, args = next(iter(dist.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{path}: space.{key}.{kind} must be a non-empty list")
        values = args
    else:
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
            raise ConfigError(f"{path}: space.{key}.{kind} must be [low, high] numbers, got {args!r}")
        low, high = args
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"{path}: space.{key}.{kind}=[{low}, {high}] is an impossible range "
                              f"(need low < high{', low > 0' if kind == 'loguniform' else ''})")
        values = [low, high]
    for value in values:  # the key must exist and every value the search can draw must be valid
        try:
            trial_config(base, {key: value})
        except ConfigError as exc:
            raise ConfigError(f"{path}: space.{key}: {exc}") from None


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base trial config with sampled ``dotted.key: value`` params applied and validated."""
    return with_values(base, params)


# ----------------------------------------------------------------------------- running


def param_space(spec: SearchSpec) -> dict[str, Any]:
    """Tune sampling domains for the search space (keys stay dotted config keys)."""
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(int(a[0]), int(a[1])), "choice": lambda a: tune.choice(a),
            "grid": lambda a: tune.grid_search(a)}  # every value, num_samples times
    return {key: make[kind](args) for key, dist in spec.space.items() for kind, args in dist.items()}


class BYOLStopper(Stopper):
    """Stops a trial whose loss is NaN/inf or whose projections collapsed, and records why.

    Collapse: the std of the l2-normalised projections (healthy ~ 1/sqrt(dim), collapsed ~ 0) below
    ``collapse_std`` for ``patience`` consecutive epoch reports. Reasons are kept in
    ``<experiment>/stop_reasons.json`` so a restored search still knows them.
    """

    def __init__(self, stop: StopSpec, reasons_file: Location) -> None:
        self.stop, self.file = stop, reasons_file
        self.low: dict[str, int] = defaultdict(int)
        self.reasons: dict[str, str] = json.loads(reasons_file.read_text()) if reasons_file.is_file() else {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        loss = result.get("epoch_loss")
        if loss is None:
            return False
        reason = None
        if not math.isfinite(loss):
            reason = "nan_loss"
        else:
            std = result.get("epoch_projection_std", 1.0)
            self.low[trial_id] = self.low[trial_id] + 1 if std < self.stop.collapse_std else 0
            if self.low[trial_id] >= self.stop.collapse_patience:
                reason = "collapsed"
        if reason:
            self.reasons[trial_id] = reason
            self.file.write_text(json.dumps(self.reasons, indent=2))
        return reason is not None

    def stop_all(self) -> bool:
        return False


def _trial(params: dict[str, Any]) -> None:
    """One Tune trial = one Ray Train run of the sampled config; epoch metrics are forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from byol_ray.ray_train import build_trainer, quiet_train_reports, verbose

    if not verbose():
        quiet_train_reports()

    params = dict(params)  # Tune keeps the dict it passed as the trial's config: do not mutate it
    base = from_dict(params.pop("__base__"))
    context = tune.get_context()
    cfg = trial_config(base, params)
    cfg = dataclasses.replace(cfg, run_name=f"{base.run_name}-{context.get_trial_id()}")
    result = build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()  # resumes its own checkpoint if any
    if result.error:
        raise result.error
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    if "val_knn_top1" in final:  # the last checkpoint's validation finishes after its report: tell Tune too
        tune.report(final)


def check_search_resources(spec: SearchSpec, base: Config) -> int:
    """How many trials fit at once; an error before any trial starts when not even one fits."""
    import ray

    total = ray.cluster_resources()
    cpus = base.ray.num_workers * base.ray.cpus_per_worker + (base.eval.cpus if base.data.val else 0)
    fits = int(total.get("CPU", 0) // cpus)
    if base.ray.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // base.ray.num_workers))
    if fits < 1:
        raise ConfigError(
            f"one trial needs {base.ray.num_workers} worker(s) x {base.ray.cpus_per_worker} CPU"
            f"{' + 1 GPU' if base.ray.use_gpu else ''} each, more than the cluster has "
            f"({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs); lower ray.num_workers/cpus_per_worker"
        )
    return min(fits, spec.max_concurrent_trials) if spec.max_concurrent_trials else fits


def run_search(search_file: str, *, name: str, overrides: list[str] | tuple[str, ...] = (), storage_path: str = "",
               resume: bool = False) -> dict[str, Any]:
    """Run (or restore and finish) a search; log it in MLflow; register the best trial's encoder.

    Args:
        search_file: the YAML search spec.
        name: experiment name; also the folder under ray.storage_path and the MLflow parent run name.
        overrides: extra trial-config overrides (``key=value``).
        storage_path: where Tune and every trial's Train run keep their state (default ``ray.storage_path``).
        resume: restore an interrupted search of this name; finished trials are not run again.

    Returns:
        The summary: rows per trial, the best trial and the registered model version.
    """
    from byol_ray.launch import check_start
    from byol_ray.run_folder import storage_root

    spec, base = load_search(search_file, overrides)
    base = dataclasses.replace(base, run_name=name, ray=dataclasses.replace(
        base.ray, storage_path=storage_path or base.ray.storage_path))
    base = check_start(base, on_ray=True)  # the checks every launcher makes, before anything is written
    storage = storage_root(base)
    experiment_dir = Location(storage) / name  # joined as a path: an object-store URI keeps its query
    if experiment_dir.exists() and not resume:
        raise ConfigError(f"a search named {name!r} already exists in {storage}; pass --resume to finish it "
                          "or choose another --search-name")
    concurrency = check_search_resources(spec, base)
    parent = _parent_run(base, spec, search_file, experiment_dir)
    base = dataclasses.replace(base, ray=dataclasses.replace(base.ray, storage_path=storage),
                               mlflow=dataclasses.replace(base.mlflow, parent_run_id=parent.run_id or ""))
    with _signal_handlers_kept():
        results = _fit(spec, base, name, storage, concurrency, resume, experiment_dir)
    summary = _summarise(spec, results, BYOLStopper(spec.stop, experiment_dir / STOP_REASONS_FILE).reasons)
    explicit = [o.split("=", 1)[1] for o in overrides if o.startswith("mlflow.register_name=")]
    register_name = (explicit[-1] if explicit else "") or spec.register_name or f"{name}-encoder"
    summary["registered"] = (_register_best(spec, base, summary, register_name, parent.run_id)
                             if spec.register_best else None)
    _log_summary(parent, summary, experiment_dir)
    return summary


@contextlib.contextmanager
def _signal_handlers_kept():
    """Tune's fit installs SIGINT (and SIGUSR1) handlers that end the search, and leaves them installed after it
    returns: a Ctrl-C while the best trial is being registered would only set Tune's stop flag, once. Put back what
    the caller had."""
    names = [n for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n)]
    main = threading.current_thread() is threading.main_thread()  # Tune installs nothing from another thread
    before = {n: signal.getsignal(getattr(signal, n)) for n in names} if main else {}
    try:
        yield
    finally:
        for n, handler in before.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(getattr(signal, n), handler)


def _fit(spec: SearchSpec, base: Config, name: str, storage: str, concurrency: int, resume: bool,
         experiment_dir: Location):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from byol_ray.ray_train import storage_args, verbose

    # The trial function only waits on its Train run, whose workers hold the CPUs/GPUs; Tune needs a
    # non-empty bundle, so it asks for a little memory instead of a CPU that the workers would lack.
    trainable = tune.with_resources(_trial, {"CPU": 0, "memory": 64 * 2**20})
    where = storage_args(experiment_dir)  # path (+ filesystem for an object store)
    if resume:
        if not tune.Tuner.can_restore(where["storage_path"], storage_filesystem=where.get("storage_filesystem")):
            raise ConfigError(f"no restorable search at {experiment_dir}; check --search-name and ray.storage_path")
        tuner = tune.Tuner.restore(where["storage_path"], trainable=trainable, resume_errored=True,
                                   storage_filesystem=where.get("storage_filesystem"))
        return tuner.fit()
    if spec.scheduler.type == "asha":
        # rungs in epochs (reports also come from mid-epoch checkpoints, so not training_iteration)
        # max_t one past the last epoch: ASHA stops a trial that reaches max_t at once, which would cancel the
        # validation of its final checkpoint; this way the trial ends by itself, after that validation
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base.train.epochs + 1,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if spec.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:
            raise ConfigError(f"search_alg: optuna needs the optuna package ({exc}); pip install optuna") from None
        search_alg = OptunaSearch()
    # trials log their own MLflow runs but register nothing: the search registers its best trial once
    trial_base = dataclasses.replace(base, mlflow=dataclasses.replace(base.mlflow, register_name=""))
    space = {**param_space(spec), "__base__": to_dict(trial_base)}
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    scheduler=scheduler, search_alg=search_alg, max_concurrent_trials=concurrency),
        # quiet by default: our own summary, not Tune's per-trial config tables (`byol-ray --verbose` restores them)
        run_config=tune.RunConfig(name=name, **storage_args(Location(storage)), verbose=2 if verbose() else 0,
                                  stop=BYOLStopper(spec.stop, experiment_dir / STOP_REASONS_FILE)),
    )
    return tuner.fit()


# ----------------------------------------------------------------------------- results


def _summarise(spec: SearchSpec, results, reasons: dict[str, str]) -> dict[str, Any]:
    """One row per trial: id, params, metric, epochs, state, why it stopped, its latest checkpoint."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        params = {k: v for k, v in (result.config or {}).items() if k != "__base__"}
        epochs = int(metrics.get("epoch", 0))
        value = metrics.get(spec.metric)
        max_epochs = int((result.config or {}).get("__base__", {}).get("train", {}).get("epochs", 0))
        if result.error is not None:
            stopped_by = "error"
        elif trial_id in reasons:
            stopped_by = reasons[trial_id]
        else:
            stopped_by = "completed" if epochs >= max_epochs else "asha"
        rows.append({"trial_id": trial_id, "params": params, spec.metric: value, "epochs": epochs,
                     "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))
                                 and (k.startswith(("epoch", "val_")) or k == "step")},
                     "state": "ERROR" if result.error is not None else "TERMINATED", "stopped_by": stopped_by,
                     "error": str(result.error)[:300] if result.error is not None else ""})
    candidates = [r for r in rows if r["stopped_by"] in ("completed", "asha") and isinstance(r[spec.metric], float)
                  and math.isfinite(r[spec.metric])]
    best = None
    if candidates:
        pick = max if spec.mode == "max" else min
        best = pick(candidates, key=lambda r: (r[spec.metric], r["epochs"]) if spec.mode == "max"
                    else (r[spec.metric], -r["epochs"]))
    return {"metric": spec.metric, "mode": spec.mode, "rows": rows, "best": best}


def _register_best(spec: SearchSpec, base: Config, summary: dict[str, Any], name: str, parent_run_id: str | None):
    """Register the best trial's online encoder as ``name``: the model card of a training run (from the trial's
    checkpoint and final metrics) plus the search's tags."""
    from byol_ray.mlflow_store import client, resolve_tracking_uri
    from byol_ray.registry import register_from_checkpoint
    from byol_ray.run_folder import latest_checkpoint

    best = summary["best"]
    if best is None or not base.mlflow.enabled or not name:
        return None
    ckpt = latest_checkpoint(dataclasses.replace(base, run_name=f"{base.run_name}-{best['trial_id']}"))
    if ckpt is None:
        return None
    uri = resolve_tracking_uri(base.mlflow.tracking_uri, base.output_dir)
    version = register_from_checkpoint(ckpt, name=name, tracking_uri=uri, metrics=best.get("metrics"))
    tags = {"search.name": base.run_name, "search.metric": spec.metric, "search.mode": spec.mode,
            f"search.{spec.metric}": str(best[spec.metric]), "search.trial_id": best["trial_id"],
            "search.params": json.dumps(best["params"], default=str), "search.parent_run_id": parent_run_id or ""}
    registry = client(uri)
    for key, value in tags.items():
        registry.set_model_version_tag(version.name, version.version, key, value)
    return {"name": version.name, "version": str(version.version), "checkpoint": str(ckpt)}


class _NoParent:
    run_id = None


def _parent_run(base: Config, spec: SearchSpec, search_file: str, experiment_dir: Location):
    """The search's MLflow parent run (created once; a restored search reopens the same one)."""
    if not base.mlflow.enabled:
        return _NoParent()
    from byol_ray.mlflow_store import check_tracking, resolve_tracking_uri
    from byol_ray.tracker import MlflowTracker

    uri = resolve_tracking_uri(base.mlflow.tracking_uri, base.output_dir)
    check_tracking(uri)
    tracker = MlflowTracker(uri, base.mlflow.experiment)
    marker = experiment_dir / "mlflow_parent_run_id"
    previous = marker.read_text().strip() if marker.is_file() else None
    tracker.start(base, run_id=previous, tags={"byol_ray.search": base.run_name, "search_file": search_file,
                                               "search.metric": spec.metric, "search.mode": spec.mode})
    if previous is None:
        tracker.client.log_text(tracker.run_id, yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False),
                                "search.yaml")
        marker.write_text(tracker.run_id)
    return tracker


def format_table(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    keys = sorted({k for r in summary["rows"] for k in r["params"]})
    head = ["trial", *keys, metric, "epochs", "state", "stopped_by"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(summary["rows"], key=lambda r: r["trial_id"]):
        value = r[metric]
        cells = [r["trial_id"], *[f"{r['params'].get(k):.4g}" if isinstance(r["params"].get(k), float)
                                  else str(r["params"].get(k)) for k in keys],
                 f"{value:.4f}" if isinstance(value, float) else str(value), str(r["epochs"]), r["state"],
                 r["stopped_by"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log_summary(parent, summary: dict[str, Any], experiment_dir: Location) -> None:
    """Print the table, save it beside the search, log it on the parent run, close the child runs."""
    table = format_table(summary)
    best = summary["best"]
    print(table, file=sys.stderr)
    print(f"[byol-ray] best trial: {best['trial_id'] if best else 'none'}"
          + (f" ({summary['metric']}={best[summary['metric']]:.4f})" if best else ""), file=sys.stderr)
    if summary.get("registered"):
        reg = summary["registered"]
        print(f"[byol-ray] registered: models:/{reg['name']}/{reg['version']}", file=sys.stderr)
    (experiment_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (experiment_dir / "summary.md").write_text(table + "\n")
    print(f"[byol-ray] search summary: {experiment_dir / 'summary.md'}", file=sys.stderr)
    if parent.run_id is None:
        return
    client = parent.client
    children = client.search_runs([client.get_run(parent.run_id).info.experiment_id],
                                   filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=1000)
    status = {"completed": "FINISHED", "error": "FAILED"}
    for row in summary["rows"]:
        for child in children:
            if child.info.run_name and child.info.run_name.endswith(row["trial_id"]):
                client.set_tag(child.info.run_id, "trial_id", row["trial_id"])
                client.set_tag(child.info.run_id, "stop_reason", row["stopped_by"])
                if child.info.status == "RUNNING":  # a trial stopped by Tune never closed its own run
                    client.set_terminated(child.info.run_id, status.get(row["stopped_by"], "KILLED"))
    if best:
        client.set_tag(parent.run_id, "best_trial", best["trial_id"])
        client.log_metric(parent.run_id, f"best_{summary['metric']}", best[summary["metric"]])
    client.log_text(parent.run_id, table + "\n", "summary.md")
    client.log_text(parent.run_id, json.dumps(summary, indent=2, default=str), "summary.json")
    parent.finish("FINISHED")
