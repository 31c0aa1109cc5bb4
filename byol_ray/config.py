"""Strict, typed run configuration: defaults ← YAML files ← ``key.sub=value`` overrides, resolved once."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from byol_ray.augment_recipe import ViewAugment
from byol_ray.errors import ConfigError, NoSpaceError  # noqa: F401 - their home for every caller

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    """Networks: encoder f, projector g, predictor q (docs/recipe.md, "Networks")."""

    encoder: str = "resnet50"
    cifar_stem: bool = False  # 3x3 stride-1 first conv, no max-pool (for 32 px images)
    projector_hidden_dim: int = 4096
    projector_dim: int = 256
    predictor_hidden_dim: int = 4096
    use_predictor: bool = True  # False is the paper's collapse ablation, not a recipe
    bn_momentum: float = 0.1  # PyTorch convention; = Haiku decay 0.9
    bn_eps: float = 1e-5
    sync_bn: Literal["auto", "on", "off"] = "auto"  # auto: on with several CUDA workers
    online_classifier: bool = True  # linear probe on stop_gradient(y) of view 1
    num_classes: int = 1000


@dataclass
class DataConfig:
    """Where images come from and how the two crops of each are cut."""

    train: str = "demo"  # 'demo', an ImageFolder split folder, a CIFAR pickle folder, or a .beton
    # 'torch': the fallback where FFCV cannot be built; 'memory': the whole (equal-size) image set decoded
    # once onto the device, crops and flips batched there (data sets that fit: CIFAR-10 is 150 MB)
    loader: Literal["ffcv", "torch", "memory"] = "ffcv"
    resolution: int = 224
    num_workers: int = 4  # data-loading threads per training worker
    cache_dir: str = "~/.cache/byol-ray"  # .beton files prepared from non-.beton sources
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # 'reference': the paper's single draw, sides clamped to the image (DeepMind's dataset.py);
    # 'torchvision': RandomResizedCrop's ten tries with a centred fallback (byol_ray/data/order.py)
    crop_law: Literal["reference", "torchvision"] = "reference"
    flip_prob: float = 0.5
    # a labelled held-out split for validation ('' = none): an image folder, a CIFAR folder, or a .beton
    # (`byol-ray prepare --val-fraction` writes one beside the training file)
    val: str = ""


@dataclass
class AugmentConfig:
    """Per-view colour augmentation; view 1 and view 2 differ only by these values."""

    view1: ViewAugment = field(default_factory=ViewAugment)
    view2: ViewAugment = field(default_factory=lambda: ViewAugment(blur_prob=0.1, solarize_prob=0.2))


@dataclass
class OptimConfig:
    """LARS and the learning-rate schedule (docs/recipe.md, "Optimiser")."""

    base_lr: float = 0.2  # peak lr = base_lr * global_batch / 256
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    eta: float = 1e-3  # LARS trust coefficient
    warmup_epochs: float = 10.0


@dataclass
class TrainConfig:
    """The loop: budget, batch, target decay, numerics, cadence of logs and checkpoints."""

    epochs: int = 1000
    batch_size: int = 4096  # GLOBAL batch, split evenly over the workers
    tau_base: float = 0.996
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype on GPU; CPU runs fp32
    channels_last: bool = True  # NHWC activations: faster on GPUs and, measured, on CPUs too (docs/benchmarks.md)
    # torch.compile (inductor) the online network (inside its DDP wrapper) and the target's forward; the EMA and
    # checkpoints read the uncompiled modules, so checkpoints are interchangeable with eager runs
    compile: bool = False
    # TEST MODE, not for training: apply train.precision's autocast on a CPU too (CPU runs are otherwise fp32),
    # to exercise the GPU precision path on a machine without a GPU (tests/test_gpu_paths.py)
    cpu_autocast: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every_steps: int = 50
    checkpoint_every_epochs: int = 1
    # mid-epoch checkpoints every this many global steps (0 = epoch ends only); a resume continues
    # inside the epoch with the same batches, crops and augmentations as an uninterrupted run.
    # 'auto': the Young-Daly interval sqrt(2 x stall x mean time between interruptions), from the checkpoint
    # stall measured in this run and interruptions_per_node_hour (byol_ray/cadence.py)
    checkpoint_every_steps: Union[int, Literal["auto"]] = 0
    # expected interruptions without usable notice, per node and hour, for checkpoint_every_steps=auto.
    # 0.01 (about 7 per node-month) is deliberately pessimistic: AWS's Spot Instance Advisor's highest band
    # is "more than 20 %" of instances interrupted per month, i.e. >= 0.0003 per instance-hour. Set it from
    # your own history (MLflow: preemption_notice events per run-hour) or 0 for on-demand nodes.
    interruptions_per_node_hour: float = 0.01


@dataclass
class EvalConfig:
    """Held-out validation during training: kNN top-1 of the online encoder on ``data.val``, computed by a
    Ray task on its own CPUs from each validated checkpoint, while training goes on."""

    every_epochs: int = 1  # validate the epoch-end checkpoint every this many epochs (and the last); 0 = never
    cpus: int = 1  # CPUs of the validation task, apart from the training workers'
    knn_k: int = 20
    knn_temperature: float = 0.1
    bank_size: int = 10000  # training images in the kNN memory bank (a seeded subset); 0 = all
    val_size: int = 10000  # held-out images scored (a seeded subset); 0 = all
    batch_size: int = 256


@dataclass
class RayConfig:
    """Ray Train scaling and fault tolerance."""

    address: str = ""  # '' = in-process local Ray (or the cluster the job was submitted to)
    num_workers: int = 1
    # elastic: 0 (= num_workers) is a fixed group; 1 <= min_workers < num_workers lets Ray Train run with
    # any size in between, shrinking when a node is lost and growing when capacity returns. The recipe does
    # not change with the size: the global batch stays train.batch_size, split in shares that differ by at
    # most one sample when the size does not divide it (gradients weighted by share; byol_ray/dist.py).
    min_workers: int = 0
    # how often (in steps) the workers ask Ray Train whether a node is being preempted (a collective call)
    preemption_poll_steps: int = 10
    # checkpoint upload: 'auto' = async when storage_path is an object-store URI, else sync; 'async' copies
    # in the background while training continues (docs/benchmarks.md "Checkpoint upload")
    checkpoint_upload: Literal["auto", "sync", "async"] = "auto"
    # seconds to wait, before the run starts, for a cluster that scales up (spot GPU nodes at min_workers 0)
    # to have room for the workers; the autoscaler is asked for them. -1 = 900 s when the cluster has an
    # autoscaler, else refuse at once; 0 = refuse at once (byol_ray/capacity.py)
    wait_for_workers_s: float = -1.0
    # seconds between Ray Train's checks for returned capacity in an elastic run (its default is 60)
    resize_check_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # torch's intra-op threads in each worker; 0 = ray.cpus_per_worker. Fewer leaves reserved CPUs to the
    # worker's loader processes (data.num_workers), or keeps workers from spinning on a node that promises more
    # CPUs than it has. OMP_NUM_THREADS is not read: Ray's cluster launcher sets it to 1 on every node.
    torch_threads: int = 0
    # checkpoints go to <storage_path>/<run_name>/checkpoints; '' = output_dir (one rule for every launcher);
    # on a cluster a shared filesystem path or an object-store URI (s3://, gs://)
    storage_path: str = ""
    max_failures: int = 0
    num_to_keep: int = 2


@dataclass
class MlflowConfig:
    """Tracking and registry."""

    enabled: bool = True
    tracking_uri: str = ""  # '' = sqlite:///<output_dir>/mlflow.db (absolute)
    experiment: str = "byol-ray"
    register_name: str = "byol-encoder"  # '' = do not register
    parent_run_id: str = ""  # set by `byol-ray tune`: each trial's run nests under the search's run
    # rank 0's node: CPU, memory, disk, network, GPU utilisation and memory through MLflow's own
    # system-metrics monitor, sampled every this many seconds (0 = off)
    system_metrics_every_s: float = 10.0


@dataclass
class Config:
    """A whole run; a YAML file is a diff over these defaults (the paper's 1000-epoch ResNet-50)."""

    run_name: str = ""  # '' = byol-<timestamp>
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config, the data set size and the world size."""

    world_size: int
    per_worker_batch: int  # batch_size // world_size: the smaller share when the size does not divide it
    num_samples: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float


# ----------------------------------------------------------------------------- loading


def load_config(sources: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from YAML files (or preset names) and CLI overrides.

    Args:
        sources: YAML paths or preset names (``demo``, ``cifar10_resnet18``, ...), applied in order.
        overrides: ``key.sub=value`` strings; values are parsed as YAML (``1e-3``, ``true``, ``[1, 2]``).

    Returns:
        The config; raises :class:`ConfigError` naming the key, the bad value and what is allowed.
    """
    tree: dict[str, Any] = {}
    for source in sources:
        _merge(tree, _read_yaml(source), Config, prefix="")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. train.epochs=10)")
        _merge(tree, _nest(key.strip(), _parse_value(raw)), Config, prefix="")
    cfg = _build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if not path.suffix and (PRESETS_DIR / f"{source}.yaml").exists():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {source!r} not found; give a YAML path or a preset name ({names})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          f"save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(tree: dict, update: dict, schema: type, prefix: str) -> None:
    """Deep-merge ``update`` into ``tree``, rejecting keys the schema does not have."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in update.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} (valid keys here: {', '.join(fields)})")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix}{key!r} is a section; give its keys, got {value!r}")
            _merge(tree.setdefault(key, {}), value, hints[key], prefix=f"{prefix}{key}.")
        else:
            tree[key] = value


def _build(schema: type, tree: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for f in dataclasses.fields(schema):
        if f.name not in tree:
            continue
        typ, value, key = hints[f.name], tree[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(typ):
            base = _default_of(f)
            merged = {**dataclasses.asdict(base), **value}
            kwargs[f.name] = _build(typ, merged, prefix=f"{key}.")
        else:
            kwargs[f.name] = _coerce(key, value, typ)
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as exc:  # a nested dataclass's own range checks
        raise ConfigError(f"invalid value in section {prefix.rstrip('.') or 'config'!r}: {exc}") from None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is Union:  # the first member that takes the value; else one line naming every accepted form
        for member in typing.get_args(typ):
            try:
                return _coerce(key, value, member)
            except ConfigError:
                continue
        forms = " or ".join(repr(a) if typing.get_origin(m) is Literal else m.__name__.replace("int", "an integer")
                            for m in typing.get_args(typ) for a in (typing.get_args(m) or (None,)))
        raise ConfigError(f"config key {key!r} = {value!r} must be {forms}")
    if origin is Literal:
        allowed = typing.get_args(typ)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off (as typed on the command line) as a bool
        if value not in allowed:
            raise ConfigError(f"config key {key!r} = {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key {key!r} = {value!r} must be a list of {len(args)} numbers")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} = {value!r} must be true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} = {value!r} must be an integer")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-5' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} = {value!r} must be a number")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):  # .inf / .nan would poison every schedule silently
            raise ConfigError(f"config key {key!r} = {value!r} must be a finite number")
        return number
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r} = {value!r} must be a string")
        return str(value)
    raise ConfigError(f"config key {key!r}: unsupported type {typ}")  # a schema bug, not user input


# ----------------------------------------------------------------------------- validation

ENCODERS = (
    "tiny", "small", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} = {value!r} is out of range; allowed: {allowed}")


def _check_finite(node: Any, prefix: str) -> None:
    """Every float in the config is finite, also in configs built with ``dataclasses.replace``."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, prefix=f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {key!r} = {value!r} must be a finite number")
        elif isinstance(value, tuple) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(f"config key {key!r} = {list(value)!r} must hold finite numbers")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express; raises :class:`ConfigError`."""
    _check_finite(cfg, prefix="")
    check_run_name(cfg.run_name)
    m, d, o, t, r = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.ray
    _check(m.encoder in ENCODERS, "model.encoder", m.encoder, ", ".join(ENCODERS))
    for key in ("projector_hidden_dim", "projector_dim", "predictor_hidden_dim", "num_classes"):
        _check(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "> 0")
    _check(0 < m.bn_momentum <= 1, "model.bn_momentum", m.bn_momentum, "(0, 1]")
    _check(0 < m.bn_eps < 1, "model.bn_eps", m.bn_eps, "(0, 1)")
    _check(bool(d.train), "data.train", d.train, "'demo', an image folder, a CIFAR folder or a .beton file")
    _check(8 <= d.resolution <= 1024, "data.resolution", d.resolution, "8..1024 pixels")
    _check(d.num_workers >= 1, "data.num_workers", d.num_workers, ">= 1 (threads per training worker)")
    _check(0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", d.crop_scale, "0 < lo <= hi <= 1")
    _check(0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", d.crop_ratio, "0 < lo <= hi")
    _check(0 <= d.flip_prob <= 1, "data.flip_prob", d.flip_prob, "[0, 1]")
    _check(o.base_lr > 0 and math.isfinite(o.base_lr), "optim.base_lr", o.base_lr, "a finite number > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "[0, 1)")
    _check(o.eta > 0, "optim.eta", o.eta, "> 0")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, ">= 0")
    _check(t.epochs >= 1, "train.epochs", t.epochs, ">= 1")
    _check(t.batch_size >= 2, "train.batch_size", t.batch_size, ">= 2 (BatchNorm needs two samples)")
    _check(0 <= t.tau_base <= 1, "train.tau_base", t.tau_base, "[0, 1]")
    _check(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, ">= 1")
    _check(t.checkpoint_every_epochs >= 1, "train.checkpoint_every_epochs", t.checkpoint_every_epochs, ">= 1")
    _check(m.sync_bn != "on" or r.use_gpu, "model.sync_bn", m.sync_bn,
           "'auto' or 'off' when ray.use_gpu=false (torch SyncBatchNorm is CUDA-only)")
    _check(t.checkpoint_every_steps == "auto" or t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps",
           t.checkpoint_every_steps, ">= 0 (0 = off) or 'auto'")
    _check(t.interruptions_per_node_hour >= 0, "train.interruptions_per_node_hour", t.interruptions_per_node_hour,
           ">= 0 (0 = never: checkpoint_every_steps=auto then checkpoints at epoch ends only)")
    e = cfg.eval
    _check(e.every_epochs >= 0, "eval.every_epochs", e.every_epochs, ">= 0 (0 = never)")
    _check(e.cpus >= 1, "eval.cpus", e.cpus, ">= 1")
    _check(e.knn_k >= 1, "eval.knn_k", e.knn_k, ">= 1")
    _check(e.knn_temperature > 0, "eval.knn_temperature", e.knn_temperature, "> 0")
    _check(e.bank_size >= 0, "eval.bank_size", e.bank_size, ">= 0 (0 = the whole training set)")
    _check(e.val_size >= 0, "eval.val_size", e.val_size, ">= 0 (0 = the whole held-out split)")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
    _check(r.num_workers >= 1, "ray.num_workers", r.num_workers, ">= 1")
    _check(0 <= r.min_workers <= r.num_workers, "ray.min_workers", r.min_workers,
           f"0 (a fixed group) or 1..ray.num_workers={r.num_workers}")
    if 0 < r.min_workers < r.num_workers and r.max_failures == 0:
        raise ConfigError(f"ray.min_workers={r.min_workers} < ray.num_workers={r.num_workers} makes the run elastic, but "
                          "ray.max_failures=0 ends it at the first lost node (Ray Train counts a node that vanishes "
                          "without a drain notice as a worker failure; noticed preemptions have their own unlimited "
                          "budget). Set ray.max_failures=N (e.g. 10) or -1 for no limit")
    _check(r.wait_for_workers_s >= -1, "ray.wait_for_workers_s", r.wait_for_workers_s,
           ">= 0 seconds, or -1 (900 s when the cluster has an autoscaler, else none)")
    _check(r.preemption_poll_steps >= 1, "ray.preemption_poll_steps", r.preemption_poll_steps, ">= 1")
    _check(r.resize_check_s >= 0, "ray.resize_check_s", r.resize_check_s, ">= 0")
    _check(r.cpus_per_worker >= 1, "ray.cpus_per_worker", r.cpus_per_worker, ">= 1")
    _check(r.torch_threads >= 0, "ray.torch_threads", r.torch_threads, ">= 0 (0 = ray.cpus_per_worker)")
    _check(r.max_failures >= -1, "ray.max_failures", r.max_failures, ">= 0, or -1 for unlimited")
    _check(r.num_to_keep >= 1, "ray.num_to_keep", r.num_to_keep, ">= 1")
    if t.batch_size < 2 * r.num_workers:
        raise ConfigError(f"config key 'train.batch_size' = {t.batch_size} gives some of the ray.num_workers="
                          f"{r.num_workers} workers fewer than 2 samples (BatchNorm needs two); the global batch is "
                          f"split over the workers, so use train.batch_size >= {2 * r.num_workers} or fewer workers")


def check_run_name(name: str, key: str = "run_name") -> None:
    """A run (or search) name is one folder name: it must not leave ``output_dir`` / ``ray.storage_path``."""
    if not name:
        return
    bad = ("/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or "?" in name
           or any(ord(c) < 32 for c in name))
    if bad:
        raise ConfigError(f"{key}={name!r} is not a plain folder name (no '/', '\\', '?', no leading '.', no '..'): "
                          "a run's outputs stay inside output_dir and ray.storage_path; use e.g. "
                          f"{key}=cifar-r18-lr0.3")


def validation_due(cfg: Config, epoch: int) -> bool:
    """Whether the checkpoint at the end of ``epoch`` (1-based) is validated (``data.val``, ``eval.every_epochs``);
    such an epoch end always writes a checkpoint."""
    every = cfg.eval.every_epochs
    return bool(cfg.data.val) and every > 0 and (epoch % every == 0 or epoch == cfg.train.epochs)


def derive(cfg: Config, num_samples: int, world_size: int | None = None) -> Derived:
    """Compute steps, warmup and the scaled learning rate once, from the real global batch.

    Args:
        cfg: the validated config.
        num_samples: training-set size.
        world_size: number of training workers (defaults to ``cfg.ray.num_workers``).

    Returns:
        The derived values; raises :class:`ConfigError` when the data set is smaller than a batch.
    """
    world_size = world_size or cfg.ray.num_workers
    # each worker takes its share (batch_share: sizes differ by at most one when the size does not divide)
    per_worker = cfg.train.batch_size // world_size
    global_batch = cfg.train.batch_size
    steps_per_epoch = num_samples // global_batch  # drop_last: every step sees a full batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the data set ({num_samples} images); "
            f"lower train.batch_size or use more data"
        )
    total = steps_per_epoch * cfg.train.epochs
    return Derived(
        world_size=world_size,
        per_worker_batch=per_worker,
        num_samples=num_samples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=min(round(cfg.optim.warmup_epochs * steps_per_epoch), total),
        peak_lr=cfg.optim.base_lr * global_batch / 256,
    )


def to_dict(cfg: Config, derived: Derived | None = None) -> dict[str, Any]:
    """Plain-dict form (tuples as lists) for YAML, MLflow params and Ray's config passing."""
    out = _plain(dataclasses.asdict(cfg))
    if derived is not None:
        out["derived"] = dataclasses.asdict(derived)
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with :func:`to_dict` (the ``derived`` section is ignored)."""
    data = {k: v for k, v in data.items() if k != "derived"}
    tree: dict[str, Any] = {}
    _merge(tree, data, Config, prefix="")
    cfg = _build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with ``dotted.key: value`` pairs applied and the result validated (e.g. a Tune trial)."""
    tree = to_dict(cfg)
    for key, value in values.items():
        _merge(tree, _nest(key, value), Config, prefix="")
    return from_dict(tree)


def save_resolved(cfg: Config, derived: Derived, path: str | Path) -> Path:
    """Write the config plus derived values as YAML next to the run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg, derived), sort_keys=False))
    return path
