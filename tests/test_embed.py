"""``byol-ray embed`` / ``knn`` from embeddings / ``serve`` on real CIFAR-10 JPEGs, a real MLflow server, real Ray.

The embeddings are the contract: every vector must equal ``mlflow.pytorch.load_model(REF)`` applied to the
model card's evaluation transform, rebuilt here from the card's own words (not from byol-ray's code).
"""
from __future__ import annotations

import base64
import re
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

from ports import free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# one name per pytest-xdist worker: the module's fixtures register it (and move its @champion) on the session's
# shared MLflow server, and a worker must not pull another worker's version
NAME = "embed-encoder" + (f"-{os.environ['PYTEST_XDIST_WORKER']}" if "PYTEST_XDIST_WORKER" in os.environ else "")


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
    _client(mlflow_server).set_registered_model_alias(NAME, "champion", mv.version)  # the README pulls @champion
    return {"uri": mlflow_server, "ref": f"models:/{NAME}/{mv.version}", "version": str(mv.version)}


@pytest.fixture(scope="module")
def dirty_val(cifar_small, tmp_path_factory) -> Path:
    """The real val JPEGs plus two files that are not images: a truncated JPEG and text named .jpg."""
    root = tmp_path_factory.mktemp("dirty") / "val"
    shutil.copytree(cifar_small[1], root)
    good = sorted((root / "cat").iterdir())[0].read_bytes()
    (root / "cat" / "zz-truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "dog" / "zz-text.jpg").write_text("not an image")
    return root


def _readme_commands() -> list[str]:
    """The commands of the README's embeddings section, in order, each joined into one line."""
    import re

    text = (REPO / "README.md").read_text()
    section = text.split("### Embeddings at scale", 1)[1].split("\n### ", 1)[0]
    found = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                found.append(line.split(" #", 1)[0].strip())
    return found


def _readme(kind: str, **fill: str) -> list[str]:
    """The README's command that starts with ``kind``, its placeholders filled in for this machine (nothing else
    of it changes): the model, the /data paths, the bucket, the head's and the server's addresses."""
    import re
    import shlex

    command = next(c for c in _readme_commands() if c.startswith(kind))
    command = command.replace("byol-demo-encoder@champion", f"{NAME}@champion")
    for placeholder, value in fill.items():
        if isinstance(value, str):
            command = command.replace(placeholder, value)
    if "s3" in fill:
        command = re.sub(r"s3://BUCKET/(\S+)", lambda m: shlex.quote(fill["s3"](m.group(1))), command)
    return shlex.split(command)


@pytest.fixture(scope="module")
def val_embeddings(registered, dirty_val, tmp_path_factory):
    """The README's local embed command on the embedded default (its own in-process Ray), as a user runs it."""
    out = tmp_path_factory.mktemp("emb") / "val"
    command = _readme("byol-ray embed", **{"/data/images/val": str(dirty_val), "/data/embeddings/val": str(out)})
    proc = _byol_ray(*command[1:], "--json", env_uri=registered["uri"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "result": json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


@pytest.mark.slow
def test_embeddings_equal_the_registered_model_on_the_cards_transform(registered, val_embeddings, dirty_val):
    out, result = val_embeddings["out"], val_embeddings["result"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"] == registered["ref"]
    assert manifest["rows"] == result["rows"] == 200 and manifest["skipped"] == 2 and manifest["num_shards"] == 1
    assert {Path(p).name for p, _ in manifest["skipped_examples"]} == {"zz-truncated.jpg", "zz-text.jpg"}
    assert "skipped 2 unreadable image(s)" in val_embeddings["stderr"]
    assert "Traceback" not in val_embeddings["stderr"]
    table = _table(out)
    assert len(table["path"]) == 200 and len(set(table["path"])) == 200
    classes = manifest["class_names"]
    assert classes == sorted(p.name for p in dirty_val.iterdir())
    assert all(classes[label] == path.split("/")[0] for path, label in zip(table["path"], table["label"]))

    model = _load_model(registered["uri"], f"models:/{NAME}@champion")
    card = _client(registered["uri"]).get_model_version(NAME, registered["version"]).tags
    transform = json.loads(card["eval_transform"])
    picks = list(range(0, 200, 13))
    x = torch.stack([_card_transform(dirty_val / table["path"][i], transform) for i in picks])
    with torch.no_grad():
        expected = model(x).numpy()
    got = np.array([table["embedding"][i] for i in picks], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    tags = _client(registered["uri"]).get_model_version(NAME, registered["version"]).tags
    assert int(tags["embed_rows"]) in (200, 600) and float(tags["embed_images_per_s"]) > 0
    run = _client(registered["uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["model_version"] == registered["version"]
    assert run.data.tags["data.source"] == str(dirty_val) and run.data.metrics["embed_rows"] == 200


@pytest.mark.slow
def test_the_same_command_again_does_nothing_and_another_source_is_refused(registered, val_embeddings, dirty_val,
                                                                           cifar_small):
    out = val_embeddings["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    command = _readme("byol-ray embed", **{"/data/images/val": str(dirty_val), "/data/embeddings/val": str(out)})
    proc = _byol_ray(*command[1:], env_uri=registered["uri"])
    assert proc.returncode == 0 and "already holds the complete embeddings" in proc.stderr, proc.stderr[-2000:]
    proc = _byol_ray("embed", "--model", registered["ref"], "--data", str(cifar_small[0]), "--out", str(out),
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


@pytest.mark.slow
def test_a_prepared_beton_is_embedded_with_its_labels(registered, cifar_small, ray_cluster, tmp_path, capsys):
    from ffcv.reader import Reader

    from byol_ray import cli
    from byol_ray.data.prepare import prepare

    beton = tmp_path / "val.beton"
    prepare(str(cifar_small[1]), str(beton), progress=False, num_workers=1)
    out = tmp_path / "emb"
    code = cli.main(["embed", "--model", registered["ref"], "--data", str(beton), "--out", str(out), "--json",
                     f"mlflow.tracking_uri={registered['uri']}"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    table = _table(out)
    reader = Reader(str(beton))
    labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    assert table["path"] == [f"#{i}" for i in range(200)] and table["label"] == [int(v) for v in labels]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_kind"] == "beton" and manifest["rows"] == 200
    assert manifest["class_names"] == sorted(p.name for p in cifar_small[1].iterdir())


@pytest.mark.slow
def test_a_killed_embed_resumes_without_recomputing_complete_shards(registered, cifar_small, ray_cluster, tmp_path):
    # on the session's cluster (RAY_ADDRESS): the embedded default's own Ray is the README command's case above
    out = tmp_path / "val"
    args = [str(BIN / "byol-ray"), "embed", "--model", registered["ref"], "--data", str(cifar_small[0]), "--out",
            str(out), "--shard-size", "20", "--batch-size", "20"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "RAY_ADDRESS": ray_cluster[0].address}
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


@pytest.mark.slow
def test_readme_job_submit_on_two_nodes_with_a_bucket_and_knn_without_reencoding(
        registered, val_embeddings, cifar_small, ray_cluster, s3_server, capsys):
    from byol_ray import cli
    from byol_ray.storage import Location

    _, dashboard = ray_cluster
    bucket = s3_server.bucket("embed")
    Location(s3_server.uri(bucket, "images/train")).upload_tree(cifar_small[0])
    in_bucket = {"s3": lambda key: s3_server.uri(bucket, key)}
    command = _readme("ray job submit", **{"http://HEAD:8265": dashboard, "http://MLFLOW:5000": registered["uri"]},
                      **in_bucket)
    proc = subprocess.run([str(BIN / "ray"), *command[1:]], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    dest = Location(s3_server.uri(bucket, "embeddings/train"))
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == 600
    assert len(manifest["nodes"]) == 2 and sum(manifest["nodes"].values()) == 600, proc.stdout[-5000:]  # rows from both nodes
    assert manifest["source"] == s3_server.uri(bucket, "images/train")

    knn = _readme("byol-ray knn", **{"/data/embeddings/val": str(val_embeddings["out"])}, **in_bucket)
    proc = _byol_ray(*knn[1:], env_uri=registered["uri"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "from embeddings: knn_top1" in line]
    assert len(said) == 1, proc.stderr[-3000:]
    top1, run_id = float(said[0].split("knn_top1 ")[1].split()[0]), said[0].split("MLflow run ")[1].split()[0]
    code = cli.main(["knn", "--model", registered["ref"], "--train", str(cifar_small[0]), "--test",
                     str(cifar_small[1]), "--json", f"mlflow.tracking_uri={registered['uri']}"])
    reencoded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and (reencoded["num_train"], reencoded["num_test"]) == (600, 200)
    assert top1 == pytest.approx(reencoded["knn_top1"], abs=1 / 200)  # the same features: the same votes
    run = _client(registered["uri"]).get_run(run_id)
    assert run.data.params["from_embeddings"] == "True" and run.data.tags["model_version"] == registered["version"]
    assert run.data.metrics["num_train"] == 600 and run.data.metrics["num_test"] == 200


@pytest.mark.slow
def test_readme_serve_and_curl_answer_like_embed(registered, val_embeddings, dirty_val, tmp_path):
    """The README's `byol-ray serve` and `curl` lines; concurrent JPEG requests, base64 PNG and uint8 arrays of
    another size in JSON, and a body that is not an image."""
    import io

    from PIL import Image

    from byol_ray.preprocess import eval_crop, to_model_input

    port = str(free_port())
    table = _table(val_embeddings["out"])
    cat = next(i for i, p in enumerate(table["path"]) if p.startswith("cat/"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")
    serve = _readme("byol-ray serve", **{"--port 8000": f"--port {port}"})
    proc = subprocess.Popen([str(BIN / "byol-ray"), *serve[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/embed"
    try:
        deadline = time.monotonic() + 240
        while "serving models:/" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        shutil.copy(dirty_val / table["path"][cat], tmp_path / "cat.jpg")
        curl = _readme("curl", **{":8000/": f":{port}/"})
        said = subprocess.run(curl, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert said.returncode == 0, said.stderr
        answer = json.loads(said.stdout)
        assert answer["model"] == registered["ref"] and answer["feature_dim"] == len(table["embedding"][cat])
        np.testing.assert_allclose(answer["embedding"], table["embedding"][cat], rtol=1e-4, atol=1e-5)

        def post(body: bytes, kind: str):
            request = urllib.request.Request(url, data=body, headers={"Content-Type": kind})
            with urllib.request.urlopen(request, timeout=60) as reply:
                return json.load(reply)

        picks = list(range(0, 200, 17))
        with ThreadPoolExecutor(6) as pool:  # concurrent requests, batched on the replica
            answers = list(pool.map(lambda i: post((dirty_val / table["path"][i]).read_bytes(), "image/jpeg"), picks))
        for i, answer in zip(picks, answers):
            np.testing.assert_allclose(answer["embedding"], table["embedding"][i], rtol=1e-4, atol=1e-5)

        with Image.open(tmp_path / "cat.jpg") as image:
            odd = np.array(image.convert("RGB").resize((57, 41)))  # another size, as a client holds it
            png = io.BytesIO()
            image.save(png, format="PNG")  # lossless: the JPEG's decoded pixels
        reply = post(json.dumps({"images": [base64.b64encode(png.getvalue()).decode()],
                                 "arrays": [odd.tolist()]}).encode(), "application/json")
        model = _load_model(registered["uri"], registered["ref"])
        with torch.no_grad():
            expected = model(to_model_input(eval_crop(odd, 32, 224 / 256)[None])).numpy()[0]
        np.testing.assert_allclose(reply["embeddings"][0], table["embedding"][cat], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(reply["embeddings"][1], expected, rtol=1e-4, atol=1e-5)

        with pytest.raises(urllib.error.HTTPError) as bad:
            post(b"not an image", "image/jpeg")
        assert bad.value.code == 400 and "not an image format" in json.load(bad.value)["error"]
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # `kill PID`, as a process manager stops a server
        code = proc.wait(timeout=60)
    assert code == 0 and "stopped serving" in (tmp_path / "serve.log").read_text()


# ----------------------------------------------------------------------------- pure parts, no Ray


def test_listing_reaches_any_depth_and_labels_only_class_folders(tmp_path):
    from PIL import Image

    from byol_ray.downstream.embed import list_images

    for rel in ("b/x.png", "a/deep/er/y.jpg", "a/z.JPEG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5, 7)).save(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("skip me")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"skip me")
    listed = list_images(str(tmp_path))
    assert listed.paths == ["a/deep/er/y.jpg", "a/z.JPEG", "b/x.png"] and listed.class_names == ["a", "b"]
    assert listed.labels.tolist() == [0, 0, 1]
    assert list_images(str(tmp_path), labels="none").labels is None
    Image.new("RGB", (5, 7)).save(tmp_path / "loose.png")  # an image beside the folders: no classes
    loose = list_images(str(tmp_path))
    assert loose.labels is None and len(loose) == 4 and loose.digest != listed.digest


def test_served_requests_decode_images_as_clients_send_them():
    import io

    from PIL import Image

    from byol_ray.downstream.serve import decode_request

    png = io.BytesIO()
    Image.new("RGBA", (9, 4), (10, 20, 30, 40)).save(png, format="PNG")
    images, single = decode_request(png.getvalue(), "image/png")
    assert single and images[0].shape == (4, 9, 3) and images[0][0, 0].tolist() == [10, 20, 30]
    grey = [[0, 255], [7, 9]]
    body = json.dumps({"images": [base64.b64encode(png.getvalue()).decode()], "arrays": [grey]}).encode()
    images, single = decode_request(body, "application/json; charset=utf-8")
    assert not single and images[1].shape == (2, 2, 3) and images[1][1, 0].tolist() == [7, 7, 7]
    for body, kind, said in ((b"", "image/jpeg", "empty body"), (b"GIF?", "image/gif", "not an image format"),
                             (b"{", "application/json", "does not parse"),
                             (b'{"pixels": []}', "application/json", '{"images"'),
                             (b'{"images": ["%%%"]}', "application/json", "images[0] is not base64"),
                             (b'{"arrays": [[[[1, 2]]]]}', "application/json", "arrays[0]: an array image must be"),
                             (b'{"arrays": [[[300]]]}', "application/json", "arrays[0]"),
                             (b'{"arrays": [[[0, 0], [0, 256]]]}', "application/json", "0..255")):
        with pytest.raises(ValueError, match=re.escape(said)):
            decode_request(body, kind)
