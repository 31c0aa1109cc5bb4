"""Registry edge: register the online encoder, pull it in a fresh process, errors, promotion rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from byol_ray.checkpoint import save_checkpoint
from byol_ray.config import derive, load_config, to_dict
from byol_ray.preprocess import to_model_input
from byol_ray.encoders import build_encoder
from byol_ray.engine import BYOLEngine
from byol_ray.registry import RegistryError, load_encoder, promote, register_encoder, register_from_checkpoint
from byol_ray.tracker import MlflowTracker

# Runs in a fresh interpreter: pulls each reference, writes its features and a trainability check.
PULL = textwrap.dedent("""
    import json, sys, torch
    uri, probe_path, out_path, refs, isolated = sys.argv[1:6]
    refs, isolated = refs.split(","), isolated == "1"
    if isolated:  # as on a machine without byol-ray: drop the editable install's import hook
        sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        try:
            import byol_ray  # noqa: F401
            raise SystemExit("byol_ray is still importable; the isolation did not work")
        except ImportError:
            pass
        import mlflow.pytorch
        mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
        load = lambda ref: (mlflow.pytorch.load_model(ref), None)
    else:
        from byol_ray.registry import load_encoder
        load = lambda ref: load_encoder(ref, tracking_uri=uri)
    probe = torch.load(probe_path)
    out = {}
    for ref in refs:
        module, info = load(ref)
        with torch.no_grad():
            features = module.eval()(probe)
        module.train()
        loss = module(probe).pow(2).mean()
        loss.backward()
        grads = [p.grad for p in module.parameters()]
        out[ref] = {"features": features, "type": type(module).__name__, "training": module.training,
                    "all_grads": all(g is not None and g.abs().sum() > 0 for g in grads),
                    "version": info.version if info else None,
                    "module_file": sys.modules[type(module).__module__].__file__}
    torch.save(out, out_path)
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BYOLEngine after two real steps (BN running statistics moved), its checkpoint and a probe batch."""
    root = tmp_path_factory.mktemp("registry")
    cfg = load_config(["demo"], [f"output_dir={root / 'runs'}", "run_name=reg", "train.batch_size=16",
                                 "model.projector_hidden_dim=64", "model.predictor_hidden_dim=64"])
    derived = derive(cfg, 64, 1)
    engine = BYOLEngine(cfg, derived, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        views = torch.randint(0, 256, (2, 16, 3, 32, 32), generator=gen, dtype=torch.uint8)
        engine.train_step(views[0], views[1], torch.randint(0, 10, (16,), generator=gen))
    probe = to_model_input(torch.randint(0, 256, (4, 3, 32, 32), generator=gen, dtype=torch.uint8))
    encoder = engine.online.encoder.eval()
    with torch.no_grad():
        expected = encoder(probe)
    assert not torch.allclose(encoder.features[1].running_mean, torch.zeros_like(encoder.features[1].running_mean))
    torch.save(probe, root / "probe.pt")
    return {"root": root, "cfg": cfg, "derived": derived, "engine": engine, "probe": probe, "expected": expected,
            "cfg_dict": to_dict(cfg, derived)}


def _checkpoint(trained, path: Path, run_id: str | None = None) -> Path:
    state = trained["engine"].state_dict()
    if run_id:
        state["mlflow_run_id"] = run_id
    return save_checkpoint(state, path)


def _pull(uri: str, refs: list[str], probe: Path, workdir: Path, isolated: bool = False) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "pulled.pt"
    argv = [uri, str(probe), str(out), ",".join(refs), "1" if isolated else "0"]
    proc = subprocess.run([sys.executable, "-c", PULL, *argv], cwd=workdir, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry URI does not follow the tracking one


def _register(encoder, name, uri, cfg_dict, run_id=None, **meta):
    return register_encoder(encoder, name=name, cfg_dict=cfg_dict, run_id=run_id, tracking_uri=uri, metadata=meta)


@pytest.mark.slow
def test_register_and_pull_in_a_fresh_process(mlflow_server, trained, tmp_path):
    name = "reg-encoder"
    tracker = MlflowTracker(mlflow_server, "registry-test")
    run_id = tracker.start(trained["cfg"], derived=trained["derived"], data_fingerprint={"sha256": "feedbeef"})
    tracker.finish()
    v1 = _register(trained["engine"].online.encoder, name, mlflow_server, trained["cfg_dict"], run_id,
                   epochs=1, metrics={"epoch_loss": 0.5})
    assert promote(name, v1.version, force=True, tracking_uri=mlflow_server)["promoted"]
    v2 = register_from_checkpoint(_checkpoint(trained, tmp_path / "ckpt" / "state.pt", run_id), name=name,
                                  tracking_uri=mlflow_server)
    assert (v1.version, v2.version) == ("1", "2")
    assert v2.run_id == run_id  # logged into the training run the checkpoint names

    refs = [f"models:/{name}@champion", f"{name}:2"]
    pulled = _pull(mlflow_server, refs, trained["root"] / "probe.pt", tmp_path / "pull")
    for ref, version in ((f"models:/{name}@champion", "1"), (f"{name}:2", "2")):
        got = pulled[ref]
        assert got["version"] == version
        assert got["type"] == "TinyEncoder"  # the real class, not a pt2 GraphModule
        assert torch.allclose(got["features"], trained["expected"], atol=1e-6), ref
        assert got["training"] and got["all_grads"]  # trainable: .train() and gradients reach every weight

    card = _client(mlflow_server).get_model_version(name, "1")
    assert card.tags["architecture"] == "tiny" and card.tags["feature_dim"] == "128"
    assert card.tags["resolution"] == "32"
    transform = json.loads(card.tags["eval_transform"])  # enough to rebuild the evaluation input exactly
    assert transform["center_crop_ratio"] == 0.875 and transform["resize_to"] == [32, 32]
    assert transform["mean"] == pytest.approx([0.485, 0.456, 0.406]) and transform["std"][0] == pytest.approx(0.229)
    assert "CenterCrop(32)" in card.description and "Resize(37)" in card.description
    assert card.tags["source_run_id"] == run_id and json.loads(card.tags["final_metrics"])["epoch_loss"] == 0.5
    card_tags = sorted(k for k in card.tags if not k.startswith("promot"))  # promote adds its own
    assert len(card_tags) <= 10, card_tags  # grouped: a version row stays short in the MLflow UI
    assert "tiny" in card.description and "trainable" in card.description
    assert card.tags["promoted_alias"] == "champion" and card.tags["promotion_forced"] == "true"
    card2 = _client(mlflow_server).get_model_version(name, "2")
    # the training run's data fingerprint follows the checkpoint
    assert json.loads(card2.tags["training"])["data_fingerprint"]["sha256"] == "feedbeef"


def test_default_sqlite_store_flow_without_server(trained, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ckpt = _checkpoint(trained, tmp_path / "ckpt" / "epoch_0001" / "state.pt")
    (ckpt.parent / "metrics.json").write_text(json.dumps({"epoch_loss": 0.25, "epoch": 1}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # as on a machine where nobody set it
    version = register_from_checkpoint(ckpt)  # name and store from the checkpoint's own config
    store = Path(trained["cfg"].output_dir) / "mlflow.db"
    uri = f"sqlite:///{store}"
    assert store.is_file() and version.name == "byol-demo-encoder"
    assert not (cwd / "mlruns").exists() and not (cwd / "mlflow.db").exists()  # nothing lands in the cwd
    assert (store.parent / "mlartifacts").is_dir()
    assert json.loads(version.tags["final_metrics"])["epoch_loss"] == 0.25
    assert json.loads(version.tags["training"])["epochs"] == 0

    promote(version.name, version.version, force=True, tracking_uri=uri)
    module, info = load_encoder(f"models:/{version.name}@champion", tracking_uri=uri, expect_arch="tiny")
    assert info.version == str(version.version) and info.aliases == ["champion"] and info.feature_dim == 128
    with torch.no_grad():
        assert torch.allclose(module(trained["probe"]), trained["expected"], atol=1e-6)

    # A machine without byol-ray installed: the package travels inside the model (code_paths).
    pulled = _pull(uri, [f"models:/{version.name}@champion"], trained["root"] / "probe.pt", tmp_path / "iso",
                   isolated=True)[f"models:/{version.name}@champion"]
    assert torch.allclose(pulled["features"], trained["expected"], atol=1e-6)
    assert pulled["all_grads"]
    assert "/code/byol_ray/" in pulled["module_file"] and not pulled["module_file"].startswith(str(Path.cwd()))


def test_lookup_errors_list_what_exists(trained, sqlite_store):
    encoder = build_encoder("tiny")
    _register(encoder, "known", sqlite_store, trained["cfg_dict"])
    _register(encoder, "known", sqlite_store, trained["cfg_dict"])
    promote("known", 1, force=True, tracking_uri=sqlite_store)
    with pytest.raises(RegistryError, match=r"no registered model named 'nope'; registered models: known"):
        load_encoder("models:/nope@champion", tracking_uri=sqlite_store)
    with pytest.raises(RegistryError, match=r"no alias 'prod'; aliases: champion→v1 \(versions \[1, 2\]\)"):
        load_encoder("known@prod", tracking_uri=sqlite_store)
    with pytest.raises(RegistryError, match=r"no version 9; versions: \[1, 2\]"):
        load_encoder("models:/known/9", tracking_uri=sqlite_store)
    with pytest.raises(RegistryError, match="is a tiny encoder, not the expected resnet50"):
        load_encoder("known:2", tracking_uri=sqlite_store, expect_arch="resnet50")
    with pytest.raises(RegistryError, match="cannot read model reference"):
        load_encoder("models:/", tracking_uri=sqlite_store)
    _, info = load_encoder("known", tracking_uri=sqlite_store)  # a bare name is the latest version
    assert info.version == "2"


def test_promotion_moves_alias_only_for_a_better_metric(trained, sqlite_store):
    client = _client(sqlite_store)
    encoder = build_encoder("tiny")
    for top1 in ("0.50", "0.40", "0.60"):
        mv = _register(encoder, "promo", sqlite_store, trained["cfg_dict"])
        client.set_model_version_tag("promo", mv.version, "linear_top1", top1)
    _register(encoder, "promo", sqlite_store, trained["cfg_dict"])  # v4: never evaluated

    first = promote("promo", 1, tracking_uri=sqlite_store)
    assert first["promoted"] and first["previous_version"] is None
    worse = promote("promo", 2, tracking_uri=sqlite_store)
    assert not worse["promoted"] and (worse["candidate"], worse["previous"]) == (0.40, 0.50)
    assert str(client.get_model_version_by_alias("promo", "champion").version) == "1"
    assert "does not beat" in client.get_model_version("promo", "2").tags["promotion_rejected_reason"]
    better = promote("promo", 3, tracking_uri=sqlite_store)
    assert better["promoted"] and better["previous_version"] == "1"
    tags = client.get_model_version("promo", "3").tags
    assert tags["promoted_over_version"] == "1" and tags["promoted_over_linear_top1"] == "0.5" and tags["promoted_at"]
    with pytest.raises(RegistryError, match="no 'linear_top1' tag; run `byol-ray linear-eval"):
        promote("promo", 4, tracking_uri=sqlite_store)
    forced = promote("promo", 2, force=True, tracking_uri=sqlite_store)
    assert forced["promoted"] and forced["reason"] == "forced"
    assert str(client.get_model_version_by_alias("promo", "champion").version) == "2"
    assert client.get_model_version("promo", "2").tags["promotion_forced"] == "true"


def test_failed_logging_registers_nothing(trained, sqlite_store, monkeypatch):
    import mlflow.pytorch

    def broken(*args, **kwargs):
        raise OSError("artifact store full")

    monkeypatch.setattr(mlflow.pytorch, "log_model", broken)
    with pytest.raises(RegistryError, match="nothing was registered: OSError: artifact store full"):
        _register(build_encoder("tiny"), "half", sqlite_store, trained["cfg_dict"])
    assert _client(sqlite_store).search_model_versions("name='half'") == []


def test_failed_registration_after_logging_says_so(trained, sqlite_store, monkeypatch):
    from mlflow import MlflowClient

    def broken(self, *args, **kwargs):
        raise RuntimeError("registry unavailable")

    monkeypatch.setattr(MlflowClient, "create_model_version", broken)
    with pytest.raises(RegistryError, match=r"was logged \(models:/m-.*registering it as 'half2'.*failed"):
        _register(build_encoder("tiny"), "half2", sqlite_store, trained["cfg_dict"])
    monkeypatch.undo()
    assert _client(sqlite_store).search_model_versions("name='half2'") == []


def test_registering_leaves_the_mlflow_tracking_uri_environment_as_it_was(tmp_path, monkeypatch):
    from byol_ray.registry import _uris

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with _uris(f"sqlite:///{tmp_path / 'a.db'}"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow's set_tracking_uri exports it; we undo that
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    with _uris(f"sqlite:///{tmp_path / 'a.db'}"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
