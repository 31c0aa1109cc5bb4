"""``byol-ray embed``: a registered encoder over an image set on Ray Data, written as restartable Parquet shards.

The pipeline (one Ray Data dataset, streamed):

    listing (driver)  ->  read + decode + eval crop (CPU tasks)  ->  encoder (actor pool, GPU when asked)
                      ->  rows gathered per shard on the driver  ->  part-NNNNN.parquet + part-NNNNN.json

DEST layout (local folder or object-store prefix)::

    manifest.json        what this DEST holds: model version, source and its listing digest, transform,
                         shard plan; ``status`` running -> complete, then row count, rate, skipped files
    part-00000.parquet   columns path (str), label (int64, when the source has class folders),
                         embedding (fixed_size_list<float32>[D]); rows in listing order
    part-00000.json      written after its Parquet file: the shard is complete (rows, skipped files)

A shard is the unit of restart: re-running the same command skips every shard whose ``.json`` exists, so a
killed job loses at most the shards in flight. A DEST whose manifest names another model version, source or
transform is refused, and so is a non-empty DEST without a manifest: nothing already written is replaced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from byol_ray.config import ConfigError
from byol_ray.data.sources import IMAGE_EXTENSIONS
from byol_ray.storage import Location, is_uri, location
from byol_ray.progress import fmt_eta, say as _say

FORMAT = "byol-ray-embeddings/1"
MANIFEST = "manifest.json"
MAX_SKIPPED_LISTED = 100  # unreadable files named in the manifest; the count is always complete


# ----------------------------------------------------------------------------- the source listing


@dataclass
class ImageList:
    """Every image of a source, in a stable order.

    Attributes:
        root: the source as given, resolved (an absolute folder, a .beton path, or an object-store URI).
        kind: 'folder' or 'beton'.
        paths: folder: paths relative to ``root`` (posix), sorted; beton: '#<index>'.
        labels: int64 per image, or None when the source has no class folders.
        class_names: label i is class_names[i] ([] without labels).
        digest: sha256 of the listing (relative path and size of every file): the source's identity.
    """

    root: str
    kind: str
    paths: list[str]
    labels: np.ndarray | None
    class_names: list[str] = field(default_factory=list)
    digest: str = ""

    def __len__(self) -> int:
        return len(self.paths)


def _walk(root: Location) -> Iterator[tuple[str, int]]:
    """(relative posix path, size) of every non-hidden image file under ``root``, any depth."""
    def wanted(rel: str) -> bool:
        parts = rel.split("/")
        return not any(p.startswith(".") for p in parts) and rel.lower().endswith(IMAGE_EXTENSIONS)

    if not root.remote:
        base = root.path
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, base).replace(os.sep, "/")
                if wanted(rel):
                    yield rel, os.path.getsize(full)
        return
    import pyarrow.fs as pafs

    prefix = root.path.rstrip("/")
    for info in root.fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            rel = info.path[len(prefix):].lstrip("/")
            if wanted(rel):
                yield rel, int(info.size or 0)


def list_images(src: str, labels: str = "auto") -> ImageList:
    """List the images of ``src``: a folder (local or object store, any depth) or a prepared ``.beton``.

    Labels (``labels='auto'``): when every image lies inside a first-level folder, those folders are the
    classes (the ImageFolder layout, sorted names); when some image lies directly in ``src``, there are none.
    ``labels='none'`` never assigns them.

    Raises:
        ConfigError: the source does not exist or holds no images.
    """
    if src.endswith(".beton"):
        return _list_beton(src, labels)
    root = location(src)
    shown = root.uri if root.remote else root.path
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is a file, not a folder of images or a .beton"
        raise ConfigError(f"--data {shown} {what}; pass a folder of images (any depth, class folders give "
                          f"labels), a prepared .beton, or an object-store prefix (s3://bucket/images/)")
    listing = sorted(_walk(root))
    if not listing:
        raise ConfigError(f"--data {shown} holds no images ({', '.join(IMAGE_EXTENSIONS)} at any depth); "
                          f"point it at the folder that holds them")
    paths = [rel for rel, _ in listing]
    digest = hashlib.sha256("".join(f"{rel}\t{size}\n" for rel, size in listing).encode()).hexdigest()
    class_names: list[str] = []
    label_array = None
    if labels == "auto" and all("/" in rel for rel in paths):
        class_names = sorted({rel.split("/", 1)[0] for rel in paths})
        index = {name: i for i, name in enumerate(class_names)}
        label_array = np.array([index[rel.split("/", 1)[0]] for rel in paths], dtype=np.int64)
    return ImageList(root=shown, kind="folder", paths=paths, labels=label_array, class_names=class_names,
                     digest=digest)


def _list_beton(src: str, labels: str) -> ImageList:
    if is_uri(src):
        raise ConfigError(f"--data {src}: an object-store .beton is staged by training jobs, not by embed; copy it "
                          f"to local disk, or point --data at the image folder in the object store")
    path = os.path.abspath(os.path.expanduser(src))
    if not os.path.isfile(path):
        raise ConfigError(f"--data {src} does not exist; pass a prepared .beton (`byol-ray prepare`), an image "
                          f"folder or an object-store prefix")
    from ffcv.reader import Reader

    reader = Reader(path)
    count = int(reader.num_samples)
    if count == 0:
        raise ConfigError(f"--data {src} holds no samples; prepare it again from the source images")
    manifest = Location(f"{path}.json")  # written beside every .beton by `byol-ray prepare`
    class_names = json.loads(manifest.read_text()).get("class_names", []) if manifest.is_file() else []
    label_array = None
    if labels == "auto" and "label" in reader.field_names:  # metadata columns are f0, f1, ... in field order
        label_array = np.asarray(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64)
    stat = os.stat(path)
    digest = hashlib.sha256(f"{os.path.basename(path)}\t{stat.st_size}\t{count}\n".encode()).hexdigest()
    return ImageList(root=path, kind="beton", paths=[f"#{i}" for i in range(count)], labels=label_array,
                     class_names=class_names, digest=digest)


# ----------------------------------------------------------------------------- the plan and its manifest


@dataclass
class Plan:
    """What one DEST holds: the model, the source, the transform, the shards."""

    model: str  # models:/<name>/<version>
    source: str
    source_kind: str
    source_digest: str
    num_images: int
    resolution: int
    center_crop_ratio: float
    shard_size: int
    transform: dict
    class_names: list[str]

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def identity(self) -> dict:
        """The fields that must match for a run to continue a DEST."""
        return {"model": self.model, "source": self.source, "source_digest": self.source_digest,
                "resolution": self.resolution, "center_crop_ratio": self.center_crop_ratio}

    def manifest(self, **extra: Any) -> dict:
        return {"format": FORMAT, **self.identity(), "source_kind": self.source_kind, "num_images": self.num_images,
                "shard_size": self.shard_size, "num_shards": self.num_shards, "transform": self.transform,
                "class_names": self.class_names, **extra}


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}"


def shown(where: Location) -> str:
    """A DEST as messages and manifests name it: the URI, or the absolute local path."""
    return where.uri if where.remote else where.path


def check_on_every_node(images: ImageList) -> None:
    """On a multi-node cluster, a local ``--data`` folder or .beton must be readable on every node (a shared mount):
    the decode tasks run wherever Ray places them. One tiny task per alive node looks for the first image."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if is_uri(images.root):
        return
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    first = images.root if images.kind == "beton" else os.path.join(images.root, images.paths[0])
    probe = ray.remote(num_cpus=0)(os.path.isfile)
    found = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(first)
                     for n in nodes])
    missing = [n[:12] for n, ok in zip(nodes, found) if not ok]
    if missing:
        raise ConfigError(f"--data {images.root} is a local folder that node(s) {', '.join(missing)} of this "
                          f"{len(nodes)}-node cluster cannot read ({first} is not there); put the images on storage "
                          f"every node mounts, or in an object store (--data s3://bucket/images/)")


def open_dest(dest: str, plan: Plan) -> tuple[Location, dict | None, set[int]]:
    """Check ``dest`` against ``plan``: (the DEST, its manifest when it has one, the shards already complete).

    Raises:
        ConfigError: DEST holds another model's, source's or transform's output, or other files.
    """
    out = location(dest)
    where = shown(out)
    if out.is_file():
        raise ConfigError(f"--out {where} is a file; pass a folder (or object-store prefix) for the shards")
    names = out.children()
    if not names:
        return out, None, set()
    if MANIFEST not in names:
        raise ConfigError(f"--out {where} already holds {len(names)} entries (e.g. {names[0]}) and no {MANIFEST}: "
                          f"embed never writes into a folder it did not create; pick a new or empty --out")
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"--out {where}/{MANIFEST} is not a byol-ray embeddings manifest; pick a new --out")
    theirs = {k: manifest.get(k) for k in plan.identity()}
    differ = [k for k, v in plan.identity().items() if theirs[k] != v]
    if "source" in differ:
        differ.remove("source_digest")  # a different source has a different listing, of course
    if differ:
        mine = plan.identity()
        what = "; ".join(f"the listing of {mine['source']} changed since it was written (files added, removed or "
                         f"resized)" if k == "source_digest" else f"{k}: it holds {theirs[k]!r}, this run has {mine[k]!r}"
                         for k in differ)
        raise ConfigError(f"--out {where} holds embeddings of another run ({what}). Nothing was written; pick a "
                          f"new --out, or delete {where} to recompute it")
    done = {int(n[len("part-"):-len(".json")]) for n in names
            if n.startswith("part-") and n.endswith(".json") and f"{n[:-len('.json')]}.parquet" in names}
    return out, manifest, done


# ----------------------------------------------------------------------------- Ray Data stages


def _reader_for(root: str):
    """A callable rel -> bytes for a folder source (local or object store)."""
    base = location(root)
    if not base.remote:
        def read_local(rel: str) -> bytes:
            with open(os.path.join(base.path, rel), "rb") as fh:
                return fh.read()
        return read_local
    fs, prefix = base.fs, base.path.rstrip("/")

    def read_remote(rel: str) -> bytes:
        with fs.open_input_stream(posixpath.join(prefix, rel)) as fh:
            return fh.read()
    return read_remote


def decode_batch(batch: dict[str, np.ndarray], *, root: str, kind: str, resolution: int,
                 center_crop_ratio: float) -> dict[str, np.ndarray]:
    """Ray Data task: read and decode a block of images and apply the evaluation crop.

    Unreadable images keep their row, with a zero image and the reason in ``error`` (the driver reports them).
    """
    import io

    from PIL import Image

    from byol_ray.data.sources import to_rgb
    from byol_ray.preprocess import eval_crop

    rows = len(batch["index"])
    images = np.zeros((rows, 3, resolution, resolution), dtype=np.uint8)
    errors = [""] * rows
    if kind == "beton":
        images[:] = _beton_crops(root, batch["index"], resolution, center_crop_ratio)
    else:
        read = _reader_for(root)
        for i, rel in enumerate(batch["path"]):
            try:
                with Image.open(io.BytesIO(read(str(rel)))) as image:
                    image.load()
                    images[i] = eval_crop(to_rgb(image), resolution, center_crop_ratio).numpy()
            except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
                errors[i] = f"{type(exc).__name__}: {exc}"[:300]
    return {**batch, "image": images, "error": np.array(errors, dtype=object)}


def _beton_crops(path: str, indices: np.ndarray, resolution: int, center_crop_ratio: float) -> np.ndarray:
    """FFCV's centre crops of some samples of a .beton (the eval loader's own decoder), in the given order."""
    from byol_ray.data.loaders import build_eval_loader

    order = np.argsort(indices)
    loader = build_eval_loader(path, backend="ffcv", batch_size=len(indices), resolution=resolution,
                               num_workers=1, center_crop_ratio=center_crop_ratio,
                               subset=np.asarray(indices, dtype=np.int64)[order])
    images = np.concatenate([x.cpu().numpy() for x, _ in loader])
    out = np.empty_like(images)
    out[order] = images
    return out


class EncodeBatch:
    """Ray Data actor: the encoder once per actor, then [B, 3, R, R] uint8 -> [B, D] float32 per batch."""

    def __init__(self, encoder_ref, precision: str = "auto") -> None:
        import ray

        from byol_ray.device import pick_device
        from byol_ray.evaluation.features import wants_bf16

        self.device = pick_device("auto")
        self.encoder = ray.get(encoder_ref[0]).to(self.device).eval()
        self.bf16 = wants_bf16(precision, self.device)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from byol_ray.evaluation.features import encode

        images = torch.from_numpy(np.require(batch.pop("image"), requirements="W")).to(self.device)
        embedding = encode(self.encoder, images, bf16=self.bf16).numpy()
        return {**batch, "embedding": embedding, "node": np.array([self.node] * len(embedding), dtype=object)}


# ----------------------------------------------------------------------------- the driver


@dataclass
class EmbedSettings:
    """How the pipeline runs (none of these change the embeddings)."""

    batch_size: int = 256  # images per encoder call
    concurrency: int = 1  # encoder actors
    num_gpus: float = 0.0  # per encoder actor
    cpus_per_actor: float = 1.0
    decode_block: int = 256  # at most this many images per decode task
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    progress_every_s: float = 10.0
    actor_start_timeout_s: int = 900


def _shard_table(rows: list[dict], dim: int, with_labels: bool):
    import pyarrow as pa

    rows.sort(key=lambda r: r["index"])
    flat = np.concatenate([r["embedding"] for r in rows]).astype(np.float32, copy=False) if rows else \
        np.zeros(0, np.float32)
    columns = {"path": pa.array([r["path"] for r in rows], pa.string())}
    if with_labels:
        columns["label"] = pa.array([r["label"] for r in rows], pa.int64())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    return pa.table(columns)


def _write_shard(out: Location, shard: int, rows: list[dict], skipped: list[list[str]], dim: int,
                 with_labels: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(_shard_table(rows, dim, with_labels), sink)
    (out / f"{shard_name(shard)}.parquet").write_bytes(sink.getvalue().to_pybytes())
    (out / f"{shard_name(shard)}.json").write_text(json.dumps({"shard": shard, "rows": len(rows),
                                                                 "skipped": skipped}))



def run_embed(encoder, images: ImageList, plan: Plan, out: Location, done: set[int],
              settings: EmbedSettings, dim: int) -> dict[str, Any]:
    """Embed every image of the shards not in ``done``; write each shard as it completes.

    Args:
        encoder: the frozen encoder (put once in the object store, read by every actor).
        images, plan: the source listing and the DEST's plan.
        out: the DEST.
        done: shards complete before this run.
        settings: how the pipeline runs.
        dim: the encoder's output width D.

    Returns:
        {rows_written, skipped (count), skipped_examples, images_per_s, seconds, nodes {node id: rows}, startup_s
        (until the first rows came back)} for this invocation (shards done before are not counted).
    """
    import pyarrow as pa
    import ray

    pending = [s for s in range(plan.num_shards) if s not in done]
    todo = np.concatenate([np.arange(s * plan.shard_size, min((s + 1) * plan.shard_size, len(images)))
                           for s in pending]) if pending else np.zeros(0, np.int64)
    stats = {"rows_written": 0, "skipped": 0, "skipped_examples": [], "nodes": {}, "shards_written": 0}
    if len(todo) == 0:
        return {**stats, "images_per_s": 0.0, "seconds": 0.0, "startup_s": 0.0}
    from byol_ray.ray_connect import verbose

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one progress line of our own instead
    ctx.print_on_execution_start = False
    # Every encoder actor is up before the first batch is handed out: otherwise the first actor to start (the one
    # on the driver's node, whose Python starts first) takes a small job whole. The wait also covers GPU nodes
    # that the autoscaler is still bringing up.
    ctx.wait_for_min_actors_s = settings.actor_start_timeout_s
    if not verbose():  # Ray Data's own INFO lines and notices behind BYOL_RAY_VERBOSE=1
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    labels = images.labels
    # Enough decode blocks to keep every CPU and every encoder actor busy, never more than decode_block images each
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_block = max(1, min(settings.decode_block, -(-len(todo) // max(4 * settings.concurrency, 2 * cpus))))
    blocks = []
    for start in range(0, len(todo), per_block):
        idx = todo[start:start + per_block]
        blocks.append(pa.table({
            "index": pa.array(idx, pa.int64()),
            "path": pa.array([images.paths[i] for i in idx], pa.string()),
            "label": pa.array(labels[idx] if labels is not None else np.full(len(idx), -1), pa.int64()),
        }))
    # On CPUs Ray Data fuses decoding into the encoder actors (same resources): one batch at a time per actor, so
    # a busy actor's queue never holds work an idle one could do. GPU actors get a second batch queued, decoded
    # by the CPU tasks while the first is encoded.
    in_flight = 2 if settings.num_gpus > 0 else 1
    encoder_ref = ray.put(encoder)
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_batch, batch_size=None, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"root": images.root, "kind": images.kind, "resolution": plan.resolution,
                                   "center_crop_ratio": plan.center_crop_ratio})
    ds = ds.map_batches(EncodeBatch, batch_size=settings.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=settings.concurrency,
                                                           max_tasks_in_flight_per_actor=in_flight), num_gpus=settings.num_gpus,
                        num_cpus=settings.cpus_per_actor,  # Ray Data spreads actors over the nodes by default
                        fn_constructor_kwargs={"encoder_ref": [encoder_ref], "precision": settings.precision})
    expected = {s: min((s + 1) * plan.shard_size, len(images)) - s * plan.shard_size for s in pending}
    buffers: dict[int, list[dict]] = {s: [] for s in pending}
    bad: dict[int, list[list[str]]] = {s: [] for s in pending}
    seen = {s: 0 for s in pending}
    began = last_said = time.monotonic()
    processed = 0
    first = None  # when the first rows came back: the pipeline's start-up (actors, model, first decode) is over
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if first is None:
            first = (time.monotonic() - began,)
        for j in range(len(batch["index"])):
            index = int(batch["index"][j])
            shard = index // plan.shard_size
            seen[shard] += 1
            processed += 1
            if batch["error"][j]:
                stats["skipped"] += 1
                bad[shard].append([str(batch["path"][j]), str(batch["error"][j])])
                continue
            node = str(batch["node"][j])
            stats["nodes"][node] = stats["nodes"].get(node, 0) + 1
            buffers[shard].append({"index": index, "path": str(batch["path"][j]), "label": int(batch["label"][j]),
                                   "embedding": batch["embedding"][j]})
        for shard in [s for s in buffers if seen[s] == expected[s]]:
            _write_shard(out, shard, buffers.pop(shard), bad[shard], dim, labels is not None)
            stats["rows_written"] += expected[shard] - len(bad[shard])
            stats["shards_written"] += 1
        now = time.monotonic()
        if now - last_said >= settings.progress_every_s:
            last_said = now
            rate = processed / (now - began)
            _say(f"embed: {processed:,}/{len(todo):,} images ({processed / len(todo):.0%}), {rate:,.0f} img/s, "
                 f"ETA {fmt_eta((len(todo) - processed) / max(rate, 1e-9))}; "
                 f"{len(done) + stats['shards_written']}/{plan.num_shards} shards written")
    seconds = time.monotonic() - began
    if buffers:  # every row is accounted for when the stream ends; anything left is a bug, not a partial shard
        raise RuntimeError(f"shards {sorted(buffers)} were not completed ({[seen[s] for s in buffers]} of "
                           f"{[expected[s] for s in buffers]} rows came back); they were not written")
    for shard in pending:
        stats["skipped_examples"].extend(bad[shard][:MAX_SKIPPED_LISTED - len(stats["skipped_examples"])])
    return {**stats, "images_per_s": processed / seconds if seconds > 0 else 0.0, "seconds": seconds,
            "startup_s": first[0] if first else 0.0}


def summarise(out: Location, plan: Plan) -> dict[str, Any]:
    """Row and skip totals over every shard's ``.json`` (this run's and earlier runs')."""
    rows, skipped, examples = 0, 0, []
    for shard in range(plan.num_shards):
        marker = json.loads((out / f"{shard_name(shard)}.json").read_text())
        rows += int(marker["rows"])
        skipped += len(marker["skipped"])
        examples.extend(marker["skipped"][:MAX_SKIPPED_LISTED - len(examples)])
    return {"rows": rows, "skipped": skipped, "skipped_examples": examples}


# ----------------------------------------------------------------------------- reading embeddings back


def is_embeddings(spec: str) -> bool:
    """True when ``spec`` is a folder (or prefix) that ``embed`` wrote (it has a manifest)."""
    if spec in ("demo",) or spec.endswith(".beton"):
        return False
    try:
        return (location(spec) / MANIFEST).is_file()
    except ConfigError:
        return False


def read_embeddings(spec: str):
    """(features float32 [N, D], labels int64 [N] or None, manifest) of a complete ``embed`` output."""
    import pyarrow.parquet as pq
    import torch

    root = location(spec)
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("status") != "complete":
        raise ConfigError(f"{spec} is an unfinished embed output (status {manifest.get('status')!r}); re-run its "
                          f"`byol-ray embed` command to complete it")
    import pyarrow as pa

    tables = []
    for shard in range(int(manifest["num_shards"])):
        part = root / f"{shard_name(shard)}.parquet"
        # Parquet needs a seekable file: pyarrow's own filesystem (random-access reads) for an object store
        tables.append(pq.read_table(part.path, filesystem=part.fs) if part.remote else pq.read_table(part.path))

    table = pa.concat_tables(tables)
    dim = table.schema.field("embedding").type.list_size
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    features = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(-1, dim).copy())
    labels = (torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
              if "label" in table.column_names else None)
    return features, labels, manifest
