"""MLflow model registry edge: register the online encoder, load it back trainable, promote an alias."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from byol_ray.config import ConfigError
from byol_ray.mlflow_store import check_tracking, ensure_experiment, resolve_tracking_uri
from byol_ray.mlflow_store import client as mlflow_client
from byol_ray.preprocess import PREPROCESSING, eval_transform, to_model_input
from byol_ray.storage import Location, location

# Serialization: mlflow.pytorch's "pickle" format (cloudpickle of the whole module) loads back as the
# same nn.Module class, so .train() and backward work for fine-tuning. The default "pt2" format
# (torch.export) loads as a GraphModule that cannot switch BatchNorm to training mode (docs/design.md, "Facts about the tools").
SERIALIZATION_FORMAT = "pickle"
PACKAGE_DIR = Path(__file__).resolve().parent


class RegistryError(ConfigError):
    """A registry lookup or registration problem; the message names what exists and the fix."""


@dataclass
class EncoderInfo:
    """What the registry says about one encoder version (the model card)."""

    name: str
    version: str
    uri: str  # models:/<name>/<version>
    aliases: list[str]
    run_id: str | None
    description: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.tags.get("architecture", "")

    @property
    def feature_dim(self) -> int:
        return int(self.tags.get("feature_dim", 0))

    @property
    def resolution(self) -> int:
        return int(self.tags.get("resolution", 0))


@contextlib.contextmanager
def _uris(tracking_uri: str):
    """Point MLflow's fluent API (which log_model/load_model use) at ``tracking_uri`` for one block."""
    import mlflow

    # set_tracking_uri also exports $MLFLOW_TRACKING_URI (for subprocesses): restoring MLflow's resolved
    # default with it would leave that default in the environment, where it then overrides byol-ray's own
    # default store. Restore what was set (None unsets the variable), not what get_tracking_uri() reports.
    previous_tracking, previous_registry = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield mlflow_client(tracking_uri)
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)


def _plain_encoder(encoder: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy without DDP or SyncBatchNorm (which needs a process group to train)."""
    from byol_ray.byol import OnlineNetwork
    from byol_ray.dist import unwrap

    encoder = unwrap(encoder)
    if isinstance(encoder, OnlineNetwork):  # the card is about f_θ, never the projector/predictor
        encoder = encoder.encoder
    encoder = copy.deepcopy(encoder).cpu().eval()
    return _revert_sync_batchnorm(encoder)


def _revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        return bn
    for name, child in module.named_children():
        setattr(module, name, _revert_sync_batchnorm(child))
    return module


def _version(pkg: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(pkg).split("+")[0]  # 2.14.1+cu130 → 2.14.1 (matches any local build)


def _requirements() -> list[str]:
    # byol-ray itself is not on a package index: its code travels with the model (code_paths), so
    # only what unpickling needs is listed.
    return [f"torch=={_version('torch')}", f"torchvision=={_version('torchvision')}",
            f"cloudpickle=={_version('cloudpickle')}", f"numpy=={_version('numpy')}"]


def model_card(cfg_dict: dict[str, Any], feature_dim: int, metadata: dict[str, Any],
               run_id: str | None) -> tuple[dict[str, str], str]:
    """Version tags and description from the run's config and the caller's metadata.

    A few flat tags that people filter on, and three grouped JSON tags (``eval_transform``, ``training``,
    ``final_metrics``), so a version row stays short in the MLflow UI while the card stays complete.

    Args:
        cfg_dict: ``to_dict(cfg, derived)`` of the training run.
        feature_dim: the encoder's output width.
        metadata: optional ``epochs`` (completed), ``step``, ``data_fingerprint`` (dict), ``metrics``
            (final epoch metrics), ``checkpoint``; any other scalar key goes into ``training``.
        run_id: the training run.

    Returns:
        (tags, description).
    """
    model, data, train = cfg_dict.get("model", {}), cfg_dict.get("data", {}), cfg_dict.get("train", {})
    optim = cfg_dict.get("optim", {})
    metadata = dict(metadata)
    resolution = int(data.get("resolution", 224))
    fingerprint = metadata.pop("data_fingerprint", None) or {}
    metrics = {k: float(f"{float(v):.6g}") for k, v in (metadata.pop("metrics", None) or {}).items()}
    training = {
        "epochs": metadata.pop("epochs", train.get("epochs")), "data": str(data.get("train", "")),
        "data_fingerprint": fingerprint, "batch_size": train.get("batch_size"), "base_lr": optim.get("base_lr"),
        "weight_decay": optim.get("weight_decay"), "tau_base": train.get("tau_base"),
        "crop_law": data.get("crop_law"), "cifar_stem": bool(model.get("cifar_stem", False)),
        **{k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))},
    }
    transform = eval_transform(resolution)
    tags = {
        "architecture": model.get("encoder", ""),
        "feature_dim": str(feature_dim),
        "resolution": str(resolution),
        "source_run_id": run_id or "",
        "byol_ray_version": _package_version(),
        "serialization_format": SERIALIZATION_FORMAT,
        "eval_transform": json.dumps(transform),
        "training": json.dumps(training, default=str),
        "final_metrics": json.dumps(metrics),
    }
    tags = {k: v[:5000] for k, v in tags.items()}  # MLflow's model-version tag limit
    description = (
        f"BYOL online encoder f_θ ({tags['architecture']}, feature_dim {feature_dim}) trained "
        f"{training['epochs']} epochs on {training['data']} at {resolution} px "
        f"(batch {train.get('batch_size', '?')}, base_lr {optim.get('base_lr', '?')}, "
        f"tau_base {train.get('tau_base', '?')}). Input: {transform['input']}. Evaluation preprocessing: "
        f"{PREPROCESSING} (torchvision: Resize({transform['resize_shorter_side_to']}), CenterCrop({resolution}), "
        f"ToTensor(), Normalize(mean={transform['mean']}, std={transform['std']})). "
        f"Output: [B, {feature_dim}] features after global average pooling. Loads with mlflow.pytorch.load_model "
        f"as a trainable torch.nn.Module (pickle format). Source run: {run_id or 'none'}."
    )
    return tags, description


def _package_version() -> str:
    try:
        return _version("byol-ray")
    except Exception:  # noqa: BLE001 - a source checkout that was never installed
        return "source"


def _bundle_code(tmp: Path) -> str:
    """A copy of the byol_ray package without caches, shipped inside the model (code_paths) so the
    pickled classes import where byol-ray is not installed."""
    target = tmp / "byol_ray"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def register_encoder(encoder: nn.Module, *, name: str, cfg_dict: dict[str, Any], run_id: str | None,
                     tracking_uri: str, metadata: dict[str, Any] | None = None, experiment: str = "byol-ray"):
    """Log the online encoder into ``run_id`` and register it as a new version of ``name``.

    Never leaves a half-registered version: if logging fails nothing is registered; if registration
    fails after logging, the error says where the logged model is and how to register it by hand.

    Args:
        encoder: the online encoder ``online.encoder`` (DDP and SyncBatchNorm are undone on a CPU copy).
        name: registered model name (``mlflow.register_name``).
        cfg_dict: ``to_dict(cfg, derived)`` of the run (architecture, resolution, recipe).
        run_id: the training run the model is logged into (None: a model without a run).
        tracking_uri: resolved tracking/registry URI.
        metadata: see :func:`model_card`.
        experiment: where a model without a run is filed (with a run: the run's experiment).

    Returns:
        The READY ``ModelVersion``.
    """
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature


    module = _plain_encoder(encoder)
    feature_dim = int(getattr(module, "feature_dim", 0))
    resolution = int(cfg_dict.get("data", {}).get("resolution", 224))
    # A fixed uint8 gradient image, normalised: the example documents the expected input range.
    ramp = torch.linspace(0, 255, resolution).round().to(torch.uint8)
    example = to_model_input(ramp.view(1, 1, 1, -1).expand(1, 3, resolution, resolution).contiguous())
    with torch.no_grad():
        output = module(example)
    feature_dim = feature_dim or output.shape[1]
    signature = infer_signature(example.numpy(), output.numpy())
    tags, description = model_card(cfg_dict, feature_dim, metadata or {}, run_id)

    with _uris(tracking_uri) as client, tempfile.TemporaryDirectory() as tmp:
        try:
            # The logged model is created here, in the run's own experiment: log_model alone would file it
            # under the fluent API's active experiment (the Default one), away from its run.
            experiment_id = (client.get_run(run_id).info.experiment_id if run_id
                             else ensure_experiment(client, experiment, tracking_uri))
            logged = client.create_logged_model(experiment_id, name="encoder", source_run_id=run_id,
                                                tags={"architecture": tags["architecture"]})
            info = mlflow.pytorch.log_model(
                module, name="encoder", serialization_format=SERIALIZATION_FORMAT, signature=signature,
                input_example=example.numpy(), pip_requirements=_requirements(),
                code_paths=[_bundle_code(Path(tmp))], run_id=run_id, model_id=logged.model_id,
                metadata={"byol_ray": tags},
            )
        except Exception as exc:
            if "logged" in locals():
                with contextlib.suppress(Exception):
                    client.finalize_logged_model(logged.model_id, "FAILED")
            raise RegistryError(f"logging the encoder to {tracking_uri} (run {run_id}) failed, nothing was "
                                f"registered: {type(exc).__name__}: {exc}") from exc
        try:
            try:
                client.create_registered_model(name, description="BYOL online encoders f_θ (byol-ray)")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags,
                                                  description=description, model_id=info.model_id)
            version = _await_ready(client, name, version.version)
        except Exception as exc:
            _delete_versions_of(client, name, info.model_uri)
            raise RegistryError(
                f"the encoder was logged ({info.model_uri}, run {run_id}) but registering it as {name!r} in "
                f"{tracking_uri} failed: {type(exc).__name__}: {exc}. No version was left behind; retry with "
                f"mlflow.register_model({info.model_uri!r}, {name!r}) or `byol-ray register --checkpoint ...`"
            ) from exc
    return version


def register_run_encoder(tracker, encoder: nn.Module, *, name: str, cfg_dict: dict[str, Any],
                         metadata: dict[str, Any]):
    """The end of a training run: register its online encoder as a new version of ``name``, once.

    A finished run resumed again adds no duplicate version (its ``registered_model`` tag says it already
    registered one). A failure is tagged on the run (``registration_error``) and re-raised: training
    succeeded, and its checkpoint can be registered later with ``byol-ray register``.

    Args:
        tracker: the run's started tracker (``run_id``, ``tracking_uri``, ``tags()``, ``set_tags()``).
        encoder: the online encoder (unwrapped or not: :func:`register_encoder` copies a plain one).
        name: registered model name; '' registers nothing.
        cfg_dict: ``to_dict(cfg, derived)`` of the run.
        metadata: see :func:`model_card`.

    Returns:
        The new ``ModelVersion``, or None when nothing was registered.
    """
    if not name or tracker.run_id is None:
        return None
    registered = tracker.tags().get("registered_model")
    if registered:
        print(f"[byol-ray] encoder already registered by this run: models:/{registered}", file=sys.stderr)
        return None
    try:
        version = register_encoder(encoder, name=name, cfg_dict=cfg_dict, run_id=tracker.run_id,
                                   tracking_uri=tracker.tracking_uri, metadata=metadata)
    except Exception as exc:
        with contextlib.suppress(Exception):
            tracker.set_tags({"registration_error": f"{type(exc).__name__}: {exc}"})
        raise
    tracker.set_tags({"registered_model": f"{version.name}/{version.version}"})
    return version


def _delete_versions_of(client, name: str, source: str) -> None:
    """Best effort: remove any version of ``name`` pointing at ``source`` (a create whose reply was lost)."""
    with contextlib.suppress(Exception):
        for mv in client.search_model_versions(f"name='{name}'"):
            if mv.source == source:
                client.delete_model_version(name, mv.version)


def _await_ready(client, name: str, version: str, timeout_s: float = 300.0):
    """Wait until a version is READY; delete it if it fails, so no half-registered version stays."""
    deadline = time.monotonic() + timeout_s
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                client.delete_model_version(name, version)
            raise RuntimeError(f"version {version} of {name!r} ended in status {mv.status} "
                               f"({mv.status_message or 'no message'}); it was deleted")
        time.sleep(0.5)


def encoder_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """The online encoder of an engine state, rebuilt exactly as :class:`BYOLEngine` builds it."""
    from byol_ray.byol import build_networks
    from byol_ray.config import from_dict

    online, _ = build_networks(from_dict(state["config"]).model)
    online.load_state_dict(state["online"])
    return online.encoder.eval()


def register_from_checkpoint(checkpoint_path: "str | Path | Location", *, name: str = "", tracking_uri: str = "",
                             metrics: dict[str, float] | None = None):
    """Register the online encoder of any checkpoint (on demand, after or during training).

    The version is logged into the training run when the checkpoint names one that this store holds
    (``state["mlflow_run_id"]``); otherwise into a new ``register-...`` run of the config's experiment.

    Args:
        checkpoint_path: a ``state.pt`` file or a checkpoint folder, local or in an object store
            (``s3://bucket/runs/<run>/checkpoints/epoch_0010``, copied to a temporary folder first).
        name: registered model name ('' = the checkpoint config's ``mlflow.register_name``).
        tracking_uri: store URI ('' = the checkpoint config's, resolved against its output_dir).
        metrics: the final metrics for the model card (default: the checkpoint folder's metrics.json, if any).

    Returns:
        The READY ``ModelVersion``.
    """
    where = location(checkpoint_path)
    if where.remote:
        with tempfile.TemporaryDirectory(prefix="byol-register-") as tmp:
            if not where.exists():
                raise FileNotFoundError(f"checkpoint {where} does not exist; pass a state.pt file or a checkpoint "
                                        "folder")
            local = where.download_tree(Path(tmp) / where.name)
            return _register_state(local, str(where), name=name, tracking_uri=tracking_uri, metrics=metrics)
    path = Path(checkpoint_path).expanduser().resolve()
    return _register_state(path, str(path), name=name, tracking_uri=tracking_uri, metrics=metrics)


def _register_state(path: Path, shown: str, *, name: str, tracking_uri: str, metrics: dict[str, float] | None):
    """:func:`register_from_checkpoint` of the local copy ``path`` of the checkpoint ``shown``."""
    from mlflow.exceptions import MlflowException

    from byol_ray.checkpoint import load_checkpoint
    from byol_ray.config import from_dict

    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    name = name or cfg.mlflow.register_name
    if not name:
        raise RegistryError("no model name: pass mlflow.register_name=NAME or set it in the run's config")
    tracking_uri = resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.output_dir)
    check_tracking(tracking_uri)
    encoder = encoder_from_checkpoint(state)
    folder = path if path.is_dir() else path.parent
    metrics_file = folder / "metrics.json"
    metadata: dict[str, Any] = {"epochs": state["epoch"], "step": state["step"], "checkpoint": shown}
    if metrics is not None:
        metadata["metrics"] = dict(metrics)
    elif metrics_file.is_file():
        metadata["metrics"] = {k: v for k, v in json.loads(metrics_file.read_text()).items()
                               if isinstance(v, (int, float))}


    client = mlflow_client(tracking_uri)
    run_id, own_run = state.get("mlflow_run_id"), False
    if run_id:
        try:
            run = client.get_run(run_id)
            metadata["data_fingerprint"] = {k[5:]: v for k, v in run.data.tags.items() if k.startswith("data.")}
        except MlflowException:
            run_id = None  # the run lives in another store: register under a run of our own
    if not run_id:
        experiment_id = ensure_experiment(client, cfg.mlflow.experiment, tracking_uri)
        run_id = client.create_run(experiment_id, run_name=f"register-{cfg.run_name or folder.name}",
                                   tags={"source_checkpoint": shown}).info.run_id
        own_run = True
    try:
        version = register_encoder(encoder, name=name, cfg_dict=state["config"], run_id=run_id,
                                   tracking_uri=tracking_uri, metadata=metadata)
    except Exception:
        if own_run:
            client.set_terminated(run_id, status="FAILED")
        raise
    if own_run:
        client.set_terminated(run_id)
    return version


# ----------------------------------------------------------------------------- lookup and load


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/n@a``, ``models:/n/3``, ``n@a``, ``n:3`` or ``n`` (latest) → (name, alias, version)."""
    ref = model_uri[len("models:/"):] if model_uri.startswith("models:/") else model_uri
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias, None
    match = re.fullmatch(r"(.+?)[/:](\d+|latest)", ref)
    if match:
        return match.group(1), None, match.group(2)
    if not ref or "/" in ref:
        raise RegistryError(f"cannot read model reference {model_uri!r}; use models:/<name>@<alias>, "
                            f"models:/<name>/<version>, <name>@<alias> or <name>:<version>")
    return ref, None, "latest"


def resolve_version(client, model_uri: str):
    """The ``ModelVersion`` a reference points to, with errors that list what exists."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(model_uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise RegistryError(f"no registered model named {name!r}; registered models: "
                            f"{', '.join(names) or 'none'}") from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if alias is not None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException:
            aliases = ", ".join(f"{a}→v{v}" for a, v in sorted(registered.aliases.items())) or "none"
            raise RegistryError(f"model {name!r} has no alias {alias!r}; aliases: {aliases} "
                                f"(versions {versions}); set one with `byol-ray promote`") from None
    if version == "latest":
        if not versions:
            raise RegistryError(f"model {name!r} has no versions")
        version = str(versions[-1])
    if int(version) not in versions:
        raise RegistryError(f"model {name!r} has no version {version}; versions: {versions or 'none'}")
    return client.get_model_version(name, version)


def _info(client, mv) -> EncoderInfo:
    registered = client.get_registered_model(mv.name)
    aliases = sorted(a for a, v in registered.aliases.items() if str(v) == str(mv.version))
    return EncoderInfo(name=mv.name, version=str(mv.version), uri=f"models:/{mv.name}/{mv.version}", aliases=aliases,
                       run_id=mv.run_id, description=mv.description or "", tags=dict(mv.tags))


def describe(model_uri: str, *, tracking_uri: str) -> EncoderInfo:
    """The model card of a reference without downloading the weights."""
    client = mlflow_client(tracking_uri)
    return _info(client, resolve_version(client, model_uri))


def load_encoder(model_uri: str, *, tracking_uri: str, expect_arch: str | None = None,
                 map_location: str | torch.device = "cpu") -> tuple[nn.Module, EncoderInfo]:
    """Pull a registered encoder as a trainable ``nn.Module`` (eval mode; call ``.train()`` to fine-tune).

    Args:
        model_uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``<name>@<alias>``,
            ``<name>:<version>`` or ``<name>`` (latest version).
        tracking_uri: the registry's URI.
        expect_arch: when given, the version's ``architecture`` tag must equal it.
        map_location: device for the weights.

    Returns:
        (encoder, info); raises :class:`RegistryError` for unknown names, aliases, versions or an
        architecture mismatch, listing what exists.
    """
    import mlflow.pytorch

    with _uris(tracking_uri) as client:
        mv = resolve_version(client, model_uri)
        info = _info(client, mv)
        if expect_arch is not None and info.architecture != expect_arch:
            raise RegistryError(f"{model_uri} (version {info.version}) is a {info.architecture or 'untagged'} encoder, "
                                f"not the expected {expect_arch}; pick a {expect_arch} version or drop the expectation")
        module = mlflow.pytorch.load_model(info.uri, map_location=map_location)
    if not isinstance(module, nn.Module):
        raise RegistryError(f"{info.uri} did not load as a torch.nn.Module (got {type(module).__name__}); "
                            f"it was not registered by byol-ray (serialization_format={SERIALIZATION_FORMAT})")
    return module.eval(), info


# ----------------------------------------------------------------------------- promotion


def promote(name: str, version: str | int, *, alias: str = "champion", metric: str = "linear_top1",
            force: bool = False, tracking_uri: str) -> dict[str, Any]:
    """Move ``alias`` to ``version`` only if its ``metric`` tag beats the current holder's (or ``force``).

    The decision and the numbers are written as tags on the candidate version.

    Args:
        name, version: the candidate.
        alias: the alias to move (``champion``).
        metric: a model-version tag written by a downstream job (``linear_top1``, ``knn_top1``, ...).
        force: move the alias regardless of the numbers (and of a missing metric).
        tracking_uri: the registry's URI.

    Returns:
        ``{name, version, alias, metric, candidate, previous_version, previous, promoted, forced, reason}``.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    candidate_mv = resolve_version(client, f"{name}/{version}")
    version = str(candidate_mv.version)
    candidate = _metric(candidate_mv, metric)
    if candidate is None and not force:
        raise RegistryError(f"version {version} of {name!r} has no {metric!r} tag; run `byol-ray linear-eval "
                            f"--model models:/{name}/{version}` (or the job that writes {metric}) first, "
                            f"or use --force")
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    previous = _metric(holder, metric) if holder is not None else None
    decision = {"name": name, "version": version, "alias": alias, "metric": metric, "candidate": candidate,
                "previous_version": str(holder.version) if holder is not None else None, "previous": previous,
                "forced": force}
    if holder is not None and str(holder.version) == version:
        decision.update(promoted=False, reason=f"version {version} already holds @{alias}")
        return decision
    if force:
        reason = "forced"
    elif holder is None:
        reason = f"@{alias} was unassigned"
    elif previous is None:
        reason = f"holder v{holder.version} has no {metric}"
    elif candidate > previous:
        reason = f"{metric} {candidate:.4f} > {previous:.4f} of v{holder.version}"
    else:
        decision.update(promoted=False,
                        reason=f"{metric} {candidate:.4f} does not beat {previous:.4f} of v{holder.version}")
        client.set_model_version_tag(name, version, "promotion_rejected_at", _now())
        client.set_model_version_tag(name, version, "promotion_rejected_reason", decision["reason"])
        return decision
    client.set_registered_model_alias(name, alias, version)
    tags = {"promoted_at": _now(), "promoted_alias": alias, "promotion_reason": reason,
            "promoted_over_version": decision["previous_version"] or "none",
            f"promoted_over_{metric}": "none" if previous is None else f"{previous:.6g}",
            "promotion_forced": str(force).lower()}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    decision.update(promoted=True, reason=reason)
    return decision


def _metric(mv, metric: str) -> float | None:
    try:
        return float(mv.tags[metric])
    except (KeyError, TypeError, ValueError):
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
