"""``byol-ray embed`` / ``knn`` from embeddings / ``serve`` on real CIFAR-10 JPEGs, a real MLflow server, real Ray.

The embeddings are the contract: every vector must equal ``mlflow.pytorch.load_model(REF)`` applied to the
model card's evaluation transform, rebuilt here from the card's own words (not from byol-ray's code).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
NAME = "embed-encoder"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _byol_ray(*args: str, env_uri: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri}
    env.pop("RAY_ADDRESS", None)  # the embedded default: an in-process Ray of its own
    return subprocess.run([str(BIN / "byol-ray"), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd or REPO)


def _table(folder: Path | str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(Path(folder).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pydict()


def _load_model(uri: str, ref: str):
    """``mlflow.pytorch.load_model(REF)`` as a downstream team calls it, against ``uri``."""
    import mlflow
    import mlflow.pytorch

    before = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pytorch.load_model(ref).eval()
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def _card_transform(path: Path, card: dict) -> torch.Tensor:
    """The model card's eval transform as a downstream team implements it from the card alone."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        side = int(card["center_crop_ratio"] * min(width, height))
        left, top = (width - side) // 2, (height - side) // 2
        out = image.resize(tuple(card["resize_to"]), Image.BICUBIC, box=(left, top, left + side, top + side))
    x = torch.from_numpy(np.array(out, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(card["mean"]).view(3, 1, 1)) / torch.tensor(card["std"]).view(3, 1, 1)


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """A random-init tiny encoder (CIFAR stem, 32 px) registered on the session's MLflow server."""
    from byol_ray.config import load_config, to_dict
    from byol_ray.encoders import build_encoder
    from byol_ray.registry import register_encoder

    root = tmp_path_factory.mktemp("embed-reg")
    cfg = load_config(["demo"], [f"output_dir={root}", "data.resolution=32"])
    torch.manual_seed(0)
    mv = register_encoder(build_encoder("tiny", cifar_stem=True), name=NAME, cfg_dict=to_dict(cfg), run_id=None,
                          tracking_uri=mlflow_server, metadata={"epochs": 0})
    return {"uri": mlflow_server, "ref": f"models:/{NAME}/{mv.version}", "version": str(mv.version)}


@pytest.fixture(scope="module")
def dirty_train(cifar_small, tmp_path_factory) -> Path:
    """The real train JPEGs plus two files that are not images: a truncated JPEG and text named .jpg."""
    root = tmp_path_factory.mktemp("dirty") / "train"
    shutil.copytree(cifar_small[0], root)
    good = sorted((root / "cat").iterdir())[0].read_bytes()
    (root / "cat" / "zz-truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "dog" / "zz-text.jpg").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def train_embeddings(registered, dirty_train, tmp_path_factory):
    """The README's embed command on the embedded default (its own in-process Ray), as a user runs it."""
    out = tmp_path_factory.mktemp("emb") / "train"
    proc = _byol_ray("embed", "--model", registered["ref"], "--data", str(dirty_train), "--out", str(out),
                     "--shard-size", "150", "--batch-size", "64", "--json", env_uri=registered["uri"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "result": json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


def test_embeddings_equal_the_registered_model_on_the_cards_transform(registered, train_embeddings, dirty_train):
    out, result = train_embeddings["out"], train_embeddings["result"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"] == registered["ref"]
    assert manifest["rows"] == result["rows"] == 600 and manifest["skipped"] == 2 and manifest["num_shards"] == 5
    assert {Path(p).name for p, _ in manifest["skipped_examples"]} == {"zz-truncated.jpg", "zz-text.jpg"}
    assert "skipped 2 unreadable image(s)" in train_embeddings["stderr"]
    assert "Traceback" not in train_embeddings["stderr"]
    table = _table(out)
    assert len(table["path"]) == 600 and len(set(table["path"])) == 600
    classes = manifest["class_names"]
    assert classes == sorted(p.name for p in dirty_train.iterdir())
    assert all(classes[label] == path.split("/")[0] for path, label in zip(table["path"], table["label"]))

    model = _load_model(registered["uri"], registered["ref"])
    card = _client(registered["uri"]).get_model_version(NAME, registered["version"]).tags
    transform = json.loads(card["eval_transform"])
    picks = list(range(0, 600, 37))
    x = torch.stack([_card_transform(dirty_train / table["path"][i], transform) for i in picks])
    with torch.no_grad():
        expected = model(x).numpy()
    got = np.array([table["embedding"][i] for i in picks], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    tags = _client(registered["uri"]).get_model_version(NAME, registered["version"]).tags
    assert tags["embed_rows"] == "600" and float(tags["embed_images_per_s"]) > 0
    run = _client(registered["uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["model_version"] == registered["version"]
    assert run.data.tags["data.source"] == str(dirty_train) and run.data.metrics["embed_rows"] == 600


def test_the_same_command_again_does_nothing_and_another_source_is_refused(registered, train_embeddings,
                                                                           cifar_small):
    out = train_embeddings["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = _byol_ray("embed", "--model", registered["ref"], "--data", str(Path(out).parent / "x"), "--out", str(out),
                     env_uri=registered["uri"])
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = _byol_ray("embed", "--model", registered["ref"], "--data", str(cifar_small[1]), "--out", str(out),
                     env_uri=registered["uri"])
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "holds embeddings of another run" in error[0] and "Traceback" not in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("case", ["unknown model", "empty folder", "foreign dest", "only unreadable"])
def test_bad_inputs_are_one_line_and_exit_2(case, registered, ray_cluster, tmp_path, capsys):
    from byol_ray import cli

    data, out, model = tmp_path / "data", tmp_path / "out", registered["ref"]
    (data / "a").mkdir(parents=True)
    (data / "a" / "x.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    if case == "unknown model":
        model = f"models:/{NAME}-nope@champion"
    elif case == "empty folder":
        shutil.rmtree(data / "a")
    elif case == "foreign dest":
        out.mkdir()
        (out / "notes.txt").write_text("someone else's")
    code = cli.main(["embed", "--model", model, "--data", str(data), "--out", str(out),
                     f"mlflow.tracking_uri={registered['uri']}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1, err
    expected = {"unknown model": "no registered model named", "empty folder": "holds no images",
                "foreign dest": "no manifest.json", "only unreadable": "none of its 1 images could be read"}[case]
    assert expected in lines[0]
    if case == "foreign dest":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


def test_a_killed_embed_resumes_without_recomputing_complete_shards(registered, cifar_small, tmp_path):
    out = tmp_path / "val"
    args = [str(BIN / "byol-ray"), "embed", "--model", registered["ref"], "--data", str(cifar_small[0]), "--out",
            str(out), "--shard-size", "20", "--batch-size", "20"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while len(list(out.glob("part-*.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*")}
    done = len([n for n in kept if n.endswith(".json")])
    assert 2 <= done < 30 and json.loads((out / "manifest.json").read_text())["status"] == "running"

    again = subprocess.run(args + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"continuing {out}: {done}/30 shards already complete" in again.stderr
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert result["embed_shards_written"] == 30 - done and result["rows"] == 600
    for name, stamp in kept.items():  # complete shards are untouched; none was rewritten
        if name.endswith(".json"):
            assert (out / name).stat().st_ino == stamp[0] and (out / name).stat().st_mtime_ns == stamp[1]
    assert sorted(_table(out)["path"]) == sorted(str(p.relative_to(cifar_small[0])) for p in
                                                 cifar_small[0].rglob("*.jpg"))


def test_job_submit_on_two_nodes_reads_and_writes_the_object_store_and_knn_needs_no_reencoding(
        registered, train_embeddings, cifar_small, ray_cluster, s3_server, capsys):
    from byol_ray import cli
    from byol_ray.storage import Location

    _, dashboard = ray_cluster
    bucket = s3_server.bucket("embed")
    Location(s3_server.uri(bucket, "images/val")).upload_tree(cifar_small[1])
    dest = s3_server.uri(bucket, "embeddings/val")
    entry = (f"byol-ray embed --model {registered['ref']} --data {s3_server.uri(bucket, 'images/val')} --out {dest} "
             f"--concurrency 2 --batch-size 16 mlflow.tracking_uri={registered['uri']}")
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", *entry.split()],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    manifest = json.loads(Location(dest).__truediv__("manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == 200
    assert len(manifest["nodes"]) == 2 and sum(manifest["nodes"].values()) == 200  # rows from both nodes

    code = cli.main(["knn", "--train", str(train_embeddings["out"]), "--test", dest, "--k", "20", "--json",
                     f"mlflow.tracking_uri={registered['uri']}"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    from_embeddings = json.loads(printed.out.strip().splitlines()[-1])
    code2 = cli.main(["knn", "--model", registered["ref"], "--train", str(cifar_small[0]), "--test",
                      str(cifar_small[1]), "--k", "20", "--json", f"mlflow.tracking_uri={registered['uri']}"])
    reencoded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == code2 == 0
    assert (from_embeddings["num_train"], from_embeddings["num_test"]) == (600, 200)
    assert from_embeddings["knn_top1"] == pytest.approx(reencoded["knn_top1"], abs=1 / 200)
    run = _client(registered["uri"]).get_run(from_embeddings["run_id"])
    assert run.data.params["from_embeddings"] == "True" and run.data.tags["model_version"] == registered["version"]


def test_served_encoder_answers_images_as_clients_hold_them_like_embed(registered, train_embeddings, dirty_train,
                                                                      tmp_path):
    from PIL import Image

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "byol-ray"), "serve", "--model", registered["ref"], "--port", str(port),
                             "--max-batch-size", "8"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/embed"
    try:
        deadline = time.monotonic() + 240
        while "serving models:/" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        table = _table(train_embeddings["out"])
        picks = list(range(0, 600, 50))

        def post(body: bytes, kind: str):
            request = urllib.request.Request(url, data=body, headers={"Content-Type": kind})
            with urllib.request.urlopen(request, timeout=60) as reply:
                return json.load(reply)

        with ThreadPoolExecutor(6) as pool:  # concurrent requests: batched on the replica
            answers = list(pool.map(lambda i: post((dirty_train / table["path"][i]).read_bytes(), "image/jpeg"),
                                    picks))
        for i, answer in zip(picks, answers):
            assert answer["model"] == registered["ref"]
            np.testing.assert_allclose(answer["embedding"], table["embedding"][i], rtol=1e-4, atol=1e-5)

        # uint8 arrays of any size and base64 PNG, in one JSON request
        with Image.open(dirty_train / table["path"][0]) as image:
            big = np.array(image.convert("RGB").resize((57, 41)))
            png = __import__("io").BytesIO()
            image.save(png, format="PNG")
        reply = post(json.dumps({"images": [base64.b64encode(png.getvalue()).decode()],
                                 "arrays": [big.tolist()]}).encode(), "application/json")
        from byol_ray.preprocess import eval_crop, to_model_input

        model = _load_model(registered["uri"], registered["ref"])
        with torch.no_grad():
            expected = model(to_model_input(eval_crop(big, 32, 224 / 256)[None])).numpy()[0]
        np.testing.assert_allclose(reply["embeddings"][0], table["embedding"][0], rtol=1e-4, atol=1e-5)  # PNG = JPEG's pixels
        np.testing.assert_allclose(reply["embeddings"][1], expected, rtol=1e-4, atol=1e-5)

        with pytest.raises(urllib.error.HTTPError) as bad:
            post(b"not an image", "image/jpeg")
        assert bad.value.code == 400 and "not an image format" in json.load(bad.value)["error"]
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # `kill PID`, as a process manager stops a server
        code = proc.wait(timeout=60)
    assert code == 0 and "stopped serving" in (tmp_path / "serve.log").read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
