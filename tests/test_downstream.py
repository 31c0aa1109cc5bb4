"""Downstream jobs: kNN golden values, demo splits, linear eval / fine-tune / kNN writing results on the version."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from byol_ray.config import load_config, to_dict
from byol_ray import cli
from byol_ray.evaluation.data import LoaderSettings, label_subset, open_splits
from byol_ray.downstream.finetune import finetune
from byol_ray.evaluation.knn import knn_predict, knn_top1
from byol_ray.downstream.linear_eval import linear_eval, topk_accuracy
from byol_ray.encoders import build_encoder
from byol_ray.registry import register_encoder


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ----------------------------------------------------------------------------- pure math


def _knn_by_hand(bank, bank_labels, queries, k, temperature, num_classes):
    """Independent loop form: cosine similarities, sort, exp(sim/T) weights, per-class sums."""
    out = []
    for q in queries:
        sims = [float(np.dot(q, b) / (np.linalg.norm(q) * np.linalg.norm(b))) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[bank_labels[i]] += math.exp(sims[i] / temperature)
        out.append(votes)
    return np.array(out)


def test_knn_weighted_votes_golden():
    # One very close neighbour of class 1 against two farther ones of class 0 (and a far class 2).
    bank = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]], dtype=np.float32)
    labels = np.array([1, 0, 0, 2])
    queries = np.array([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.5]], dtype=np.float32)  # norms differ: cosine ignores them
    for k, temperature in ((3, 0.1), (3, 1.0), (200, 0.1)):
        expected = _knn_by_hand(bank, labels, queries, min(k, 4), temperature, 3)
        got = knn_predict(torch.from_numpy(bank), torch.from_numpy(labels), torch.from_numpy(queries),
                          num_classes=3, k=k, temperature=temperature)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    sharp = knn_predict(torch.from_numpy(bank), torch.from_numpy(labels), torch.from_numpy(queries[:1]),
                        num_classes=3, k=3, temperature=0.1)
    flat = knn_predict(torch.from_numpy(bank), torch.from_numpy(labels), torch.from_numpy(queries[:1]),
                       num_classes=3, k=3, temperature=1.0)
    assert sharp.argmax().item() == 1 and flat.argmax().item() == 0  # T decides: e^10 > 2e^6, but e^1 < 2e^0.6
    assert knn_top1(torch.from_numpy(bank), torch.from_numpy(labels), torch.from_numpy(queries),
                    torch.tensor([1, 0, 2]), k=3) == pytest.approx(1.0)


def test_knn_chunks_agree_with_one_block():
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=gen), torch.randn(23, 8, generator=gen)
    labels = torch.randint(0, 5, (50,), generator=gen)
    whole = knn_predict(bank, labels, queries, num_classes=5, k=7, temperature=0.1)
    chunked = knn_predict(bank, labels, queries, num_classes=5, k=7, temperature=0.1, chunk_size=4)
    torch.testing.assert_close(whole, chunked)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(logits, torch.tensor([1, 1, 0]), ks=(1, 2, 5))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 5: pytest.approx(1.0)}


# ----------------------------------------------------------------------------- splits


def test_demo_holdout_split_is_disjoint_stratified_and_seeded():
    train, test, note = open_splits("demo", None, seed=0)
    train2, test2, _ = open_splits("demo", "demo", seed=0)
    _, test_other, _ = open_splits("demo", None, seed=1)
    assert "holdout" in note or "stratified" in note
    tr, te = set(train.source.indices.tolist()), set(test.source.indices.tolist())
    assert not tr & te and len(tr | te) == 1797
    assert np.array_equal(test.source.indices, test2.source.indices)  # same seed, same split
    assert not np.array_equal(test.source.indices, test_other.source.indices)
    counts = np.bincount(test.source.labels, minlength=10)
    assert counts.min() >= 30 and abs(len(te) - 0.2 * 1797) < 10  # ~20% of every class
    subset = label_subset(train.source.labels, 0.1, seed=0)
    per_class = np.bincount(train.source.labels[subset], minlength=10)
    assert per_class.min() >= 13 and per_class.max() <= 15  # class-balanced 10% of ~143 per class


# ----------------------------------------------------------------------------- jobs on the demo data


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A random-init tiny encoder registered in a local sqlite store."""
    root = tmp_path_factory.mktemp("downstream")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(["demo"], [f"output_dir={root}"])
    torch.manual_seed(0)
    mv = register_encoder(build_encoder("tiny", cifar_stem=True), name="ds-encoder", cfg_dict=to_dict(cfg),
                          run_id=None, tracking_uri=uri, metadata={"epochs": 0})
    return {"uri": uri, "name": "ds-encoder", "version": str(mv.version)}


def _run(registry, *argv) -> dict:
    out = cli.main([argv[0], "--model", f"{registry['name']}:{registry['version']}", "--json",
                    f"mlflow.tracking_uri={registry['uri']}", "mlflow.experiment=ds-test", *argv[1:]])
    assert out == 0
    return _client(registry["uri"]).get_model_version(registry["name"], registry["version"]).tags


def test_linear_eval_cli_tags_the_version(registry, capsys):
    tags = _run(registry, "linear-eval", "--epochs", "3", "--lrs", "0.4,0.1", "--batch-size", "128")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    top1, top5 = float(tags["linear_top1"]), float(tags["linear_top5"])
    # A random-init encoder: better than chance (0.1) on digits, yet not perfect.
    assert 0.1 < top1 < 1.0 and top1 <= top5 <= 1.0
    assert top1 == pytest.approx(printed["linear_top1"], rel=1e-4)
    assert printed["linear_base_lr"] in (0.4, 0.1) and "holdout_top1_lr0.4" in printed
    assert float(tags["linear_lr"]) == pytest.approx(printed["linear_base_lr"] * 128 / 256)
    run = _client(registry["uri"]).get_run(tags["linear_eval_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_name"] == registry["name"] and run.data.tags["model_version"] == registry["version"]
    assert run.data.metrics["linear_top1"] == pytest.approx(printed["linear_top1"])
    assert run.data.params["epochs"] == "3" and "holdout" in run.data.tags["data.test_note"]


def test_knn_cli_tags_the_version(registry, capsys):
    tags = _run(registry, "knn", "--k", "20")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.1 < float(tags["knn_top1"]) <= 1.0 and tags["knn_k"] == "20"
    assert float(tags["knn_top1"]) == pytest.approx(printed["knn_top1"], rel=1e-4)
    assert printed["num_train"] + printed["num_test"] == 1797


def test_finetune_cli_on_a_label_subset_tags_the_version(registry, capsys):
    tags = _run(registry, "finetune", "--epochs", "1", "--label-fraction", "0.1", "--batch-size", "32")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= float(tags["finetune_top1"]) <= 1.0 and tags["finetune_label_fraction"] == "0.1"
    assert tags["finetune_top1_labels0.1"] == tags["finetune_top1"]
    assert 130 <= printed["num_train"] <= 150  # 10% of the ~1438 training images, class-balanced
    assert _client(registry["uri"]).get_run(tags["finetune_run_id"]).info.status == "FINISHED"


def test_finetune_updates_the_encoder_and_linear_eval_does_not():
    train, test, _ = open_splits("demo", None)
    settings = LoaderSettings(resolution=32, batch_size=64, num_workers=0, center_crop_ratio=1.0)
    torch.manual_seed(0)
    encoder = build_encoder("tiny", cifar_stem=True)
    before = [p.detach().clone() for p in encoder.parameters()]
    result = linear_eval(encoder, train, test, settings, epochs=1, base_lrs=(0.2,), augment=True)
    assert result["mode"] == "augment" and "holdout_top1_lr0.2" not in result  # one lr: no selection
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))  # frozen
    result = finetune(encoder, train, test, settings, epochs=1, label_fraction=0.1, base_lr=0.1)
    assert 0.0 <= result["finetune_top1"] <= result["finetune_top5"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters()))  # trained end to end


def test_unknown_model_is_a_clean_cli_error(registry, capsys):
    code = cli.main(["knn", "--model", "models:/missing@champion", f"mlflow.tracking_uri={registry['uri']}"])
    assert code == 2
    assert "no registered model named 'missing'" in capsys.readouterr().err


def test_register_and_promote_cli(registry, tmp_path, capsys):
    from byol_ray.checkpoint import save_checkpoint
    from byol_ray.config import derive
    from byol_ray.engine import BYOLEngine

    cfg = load_config(["demo"], [f"output_dir={tmp_path}", "model.projector_hidden_dim=32",
                                 "model.predictor_hidden_dim=32"])
    ckpt = save_checkpoint(BYOLEngine(cfg, derive(cfg, 256, 1), torch.device("cpu")).state_dict(),
                           tmp_path / "epoch_0001" / "state.pt")
    client = _client(registry["uri"])
    for top1 in ("0.5", "0.7"):
        assert cli.main(["register", "--checkpoint", str(ckpt.parent), "mlflow.register_name=cli-encoder",
                         f"mlflow.tracking_uri={registry['uri']}", "--json"]) == 0
        version = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"]
        client.set_model_version_tag("cli-encoder", str(version), "linear_top1", top1)
    assert not (tmp_path / "mlflow.db").exists()  # mlflow.tracking_uri= wins over the checkpoint's own store

    def promote(ref: str) -> tuple[int, dict, str]:
        code = cli.main(["promote", "--model", ref, f"mlflow.tracking_uri={registry['uri']}", "--json"])
        out, err = capsys.readouterr()  # the decision on stdout, the human line on stderr
        return code, json.loads(out), err.strip().splitlines()[0]

    code, decision, line = promote("cli-encoder:1")
    assert code == 0 and decision["promoted"] and "-> v1" in line
    code, decision, line = promote("models:/cli-encoder/2")
    assert decision["promoted"] and (decision["previous"], decision["candidate"]) == (0.5, 0.7)
    code, decision, line = promote("cli-encoder:1")
    assert not decision["promoted"] and "stays on v2" in line
    assert str(client.get_model_version_by_alias("cli-encoder", "champion").version) == "2"


def test_features_of_an_ffcv_split_keep_every_label_in_order(tmp_path):
    """FFCV reuses a batch's buffers a few batches later: the collected labels must be copies."""
    from byol_ray.data.prepare import prepare
    from byol_ray.data.sources import open_source
    from byol_ray.evaluation.data import eval_loader, open_split
    from byol_ray.evaluation.features import extract_features

    beton = tmp_path / "demo.beton"
    prepare("demo", str(beton), progress=False)
    split = open_split(str(beton), "train")
    settings = LoaderSettings(resolution=32, batch_size=64, num_workers=1, center_crop_ratio=1.0)
    features, labels = extract_features(build_encoder("tiny"), eval_loader(split, settings))
    stored = torch.cat([target.clone() for _, target in eval_loader(split, settings)])  # copied at once
    expected = torch.from_numpy(open_source("demo").labels)
    assert features.shape == (len(expected), 128)
    assert torch.equal(labels, stored)
    assert torch.equal(torch.bincount(labels), torch.bincount(expected))
