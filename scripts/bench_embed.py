"""Embeddings: ``byol-ray embed``'s Ray Data path vs a plain PyTorch DataLoader + model loop, and the served encoder.

Part 1, paired interleaved rounds on the same images and the same cores (A, B, A, B, ...):
  A. :func:`byol_ray.downstream.embed.run_embed` (the code behind ``byol-ray embed``) on the embedded default's
     in-process Ray: ``--concurrency`` encoder actors of one CPU each, Parquet shards written.
  B. the loop a user would write: a ``torch.utils.data.DataLoader`` (``--loader-workers`` decode processes, the
     same eval crop) and the same model in this process (torch's default threads), features kept in memory.
  Each round times A and B on the first N images and on 2N images. Reported per path: the whole-call rate at N,
  and the marginal rate N / (T(2N) - T(N)), the rate at scale once each path's fixed start-up (Ray's actor
  processes and model load, the DataLoader's worker processes) is paid; the median of the paired ratios A/B of
  each; the load average.

Part 2, the served encoder (``byol-ray serve``'s deployment on the same in-process Ray, one replica): for each
``--max-batch-size``, the latency of one request at a time (p50/p95) and the throughput of 16 concurrent clients
posting JPEGs.

    .venv/bin/python scripts/bench_embed.py --images 1500 --rounds 3 [--write]

Part 3 (``--scaling``, on its own): scaling with encoder actors across nodes. A loopback Ray cluster of two nodes
with one CPU each (a head and a second node, separate raylets); paired rounds of ``run_embed`` with 1 actor
(one node) and 2 actors (both nodes) on the same ``--images`` images, reported as images/s and the median ratio.

    .venv/bin/python scripts/bench_embed.py --scaling --images 2000 --rounds 3 [--write]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def extract(archive: Path, out: Path, count: int) -> Path:
    """The first ``count`` test JPEGs of the CIFAR-10 archive, class folders kept."""
    written = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == "test":
                target = out / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                written += 1
                if written == count:
                    break
    return out


class Folder:
    """The plain loop's dataset: read, decode, the same eval crop as ``embed``."""

    def __init__(self, root: Path, paths: list[str], resolution: int) -> None:
        self.root, self.paths, self.resolution = root, paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from byol_ray.data.sources import read_image
        from byol_ray.preprocess import eval_crop

        return eval_crop(read_image(self.root / self.paths[i]), self.resolution)


def plain_loop(encoder, root: Path, paths: list[str], resolution: int, batch_size: int, workers: int) -> float:
    """Seconds to embed ``paths`` (the DataLoader's worker start-up included)."""
    import torch

    from byol_ray.preprocess import to_model_input

    began = time.perf_counter()
    loader = torch.utils.data.DataLoader(Folder(root, paths, resolution), batch_size=batch_size,
                                         num_workers=workers, persistent_workers=False)
    out = []
    with torch.no_grad():
        for images in loader:
            out.append(encoder(to_model_input(images)).float())
    assert sum(len(o) for o in out) == len(paths)
    return time.perf_counter() - began


def ray_path(encoder, images, plan_args: dict, settings, dest: Path) -> float:
    """Seconds to embed ``images`` with ``run_embed`` into a new ``dest`` (actor start-up included)."""
    from byol_ray.downstream.embed import Plan, open_dest, run_embed
    from byol_ray.storage import location

    plan = Plan(**{**{k: v for k, v in plan_args.items() if k != "dim"}, "num_images": len(images)})
    out, _, done = open_dest(str(dest), plan)
    began = time.perf_counter()
    stats = run_embed(encoder, images, plan, location(str(dest)), done, settings, plan_args["dim"])
    assert stats["rows_written"] == len(images)
    return time.perf_counter() - began


def serve_figures(store: str, ref: str, jpegs: list[bytes], batch_sizes: list[int], port: int) -> list[dict]:
    from ray import serve

    from byol_ray.downstream.serve import build_app

    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}/embed"

    def post(body: bytes) -> float:
        began = time.perf_counter()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            json.load(reply)
        return time.perf_counter() - began

    rows = []
    for batch in batch_sizes:
        app = build_app(ref, store, resolution=32, center_crop_ratio=224 / 256, precision="fp32", max_batch_size=batch,
                        batch_wait_timeout_s=0.005, num_replicas=1, max_replicas=1, num_gpus=0, num_cpus=1)
        serve.run(app, name="bench", route_prefix="/embed", logging_config={"log_level": "WARNING"})
        for body in jpegs[:10]:
            post(body)  # warm-up
        latencies = sorted(post(body) for body in jpegs[:200])
        began = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(post, jpegs[:800]))
        throughput = 800 / (time.perf_counter() - began)
        rows.append({"max_batch_size": batch, "p50_ms": 1000 * latencies[len(latencies) // 2],
                     "p95_ms": 1000 * latencies[int(0.95 * len(latencies))], "concurrent16_img_s": throughput})
        print(f"serve max_batch_size {batch}: p50 {rows[-1]['p50_ms']:.1f} ms, p95 {rows[-1]['p95_ms']:.1f} ms, "
              f"{throughput:.1f} img/s with 16 concurrent clients", flush=True)
        serve.delete("bench")
    serve.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="N: each round times N and 2N images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=2, help="encoder actors of the Ray Data path (1 CPU each)")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes of the plain loop")
    parser.add_argument("--serve-batch-sizes", default="1,8,32")
    parser.add_argument("--scaling", action="store_true", help="only part 3: 1 vs 2 actors on a two-node cluster")
    parser.add_argument("--write", action="store_true", help="append the figures to docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import torch

    from byol_ray.config import load_config, to_dict
    from byol_ray.downstream.embed import EmbedSettings, ImageList, list_images
    from byol_ray.encoders import build_encoder
    from byol_ray.preprocess import eval_transform
    from byol_ray.ray_connect import init_ray
    from byol_ray.registry import load_encoder, register_encoder

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    root = extract(ARCHIVE, work / "images", 2 * args.images)
    store = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(["cifar10_cpu"], [f"output_dir={work}", f"model.encoder={args.encoder}"])
    torch.manual_seed(0)
    register_encoder(build_encoder(args.encoder, cifar_stem=True), name="bench", cfg_dict=to_dict(cfg), run_id=None,
                     tracking_uri=store, metadata={"epochs": 0})
    encoder, info = load_encoder("bench:1", tracking_uri=store)
    every = list_images(str(root))
    n = args.images
    small = ImageList(root=every.root, kind="folder", paths=every.paths[:n], labels=every.labels[:n],
                      class_names=every.class_names, digest=every.digest)
    resolution = info.resolution
    with torch.no_grad():
        dim = int(encoder(torch.zeros(1, 3, resolution, resolution)).shape[1])
    plan_args = dict(model=info.uri, source=every.root, source_kind="folder", source_digest=every.digest,
                     num_images=len(every), resolution=resolution, center_crop_ratio=224 / 256, shard_size=100000,
                     transform=eval_transform(resolution), class_names=every.class_names, dim=dim)
    if args.scaling:
        return scaling(args, encoder, small, plan_args, work)
    init_ray()
    import ray

    settings = EmbedSettings(batch_size=args.batch_size, concurrency=args.concurrency, progress_every_s=1e9)
    load_start = os.getloadavg()  # before the warm-up: how quiet the machine was
    # warm-up of both (worker processes, imports, page cache), not timed
    ray_path(encoder, small, plan_args, settings, work / "warm")
    plain_loop(encoder, root, small.paths, resolution, args.batch_size, args.loader_workers)
    rounds = []
    for r in range(args.rounds):
        t = {"A": {}, "B": {}}
        for size, subset in (("N", small), ("2N", every)):
            t["A"][size] = ray_path(encoder, subset, plan_args, settings, work / f"round{r}-{size}")
            t["B"][size] = plain_loop(encoder, root, subset.paths, resolution, args.batch_size, args.loader_workers)
        row = {p: {"whole": n / t[p]["N"], "marginal": n / (t[p]["2N"] - t[p]["N"]), **t[p]} for p in "AB"}
        rounds.append(row)
        print(f"round {r + 1}: Ray Data {row['A']['whole']:.1f} img/s whole at N, {row['A']['marginal']:.1f} marginal; "
              f"plain loop {row['B']['whole']:.1f} whole, {row['B']['marginal']:.1f} marginal", flush=True)
    load_end = os.getloadavg()
    med = statistics.median
    summary = {}
    for key in ("whole", "marginal"):
        ratios = [row["A"][key] / row["B"][key] for row in rounds]
        summary[key] = {"ray_data": med(row["A"][key] for row in rounds), "plain": med(row["B"][key] for row in rounds),
                        "median_ratio": med(ratios), "ratio_range": [min(ratios), max(ratios)]}
    summary.update(load_start=load_start, load_end=load_end)
    print(json.dumps(summary), flush=True)
    jpegs = [(root / p).read_bytes() for p in every.paths[:800]]
    serve_rows = serve_figures(store, info.uri, jpegs, [int(b) for b in args.serve_batch_sizes.split(",")],
                               port=18265 + os.getpid() % 1000)
    serve_load = os.getloadavg()
    ray.shutdown()
    if not args.write:
        return
    today = time.strftime("%Y-%m-%d")
    lines = [f"\n## Embeddings: `byol-ray embed` on Ray Data vs a plain DataLoader loop, and the served encoder "
             f"({today})\n",
             f"`.venv/bin/python scripts/bench_embed.py --images {n} --rounds {args.rounds} --write` on the 2-core "
             f"CPU machine: real CIFAR-10 test JPEGs, a {args.encoder} encoder (CIFAR stem, {resolution} px, random "
             f"weights: the speed does not depend on them), batch {args.batch_size}. A: `run_embed` on the embedded "
             f"default's in-process Ray, {args.concurrency} encoder actors of 1 CPU (on CPUs Ray Data fuses the "
             f"decode into them), Parquet written. B: a DataLoader with {args.loader_workers} decode processes and "
             f"the model in the main process. Each of {args.rounds} interleaved paired rounds times A and B on N = "
             f"{n} and 2N = {2 * n} images, after one warm-up of each; whole = N / T(N), marginal = N / (T(2N) - "
             f"T(N)), the rate once each path's fixed start-up is paid. Load average {load_start[0]:.2f} before the "
             f"warm-up, "
             f"{load_end[0]:.2f} at end (1 min; the benchmark itself keeps both cores busy).\n",
             "| round | A whole | B whole | A/B whole | A marginal | B marginal | A/B marginal |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['A']['whole']:.1f} | {r['B']['whole']:.1f} | {r['A']['whole'] / r['B']['whole']:.3f} | "
              f"{r['A']['marginal']:.1f} | {r['B']['marginal']:.1f} | {r['A']['marginal'] / r['B']['marginal']:.3f} |"
              for i, r in enumerate(rounds)]
    w, m = summary["whole"], summary["marginal"]
    lines += [f"| **median** | {w['ray_data']:.1f} | {w['plain']:.1f} | **{w['median_ratio']:.3f}** | "
              f"{m['ray_data']:.1f} | {m['plain']:.1f} | **{m['median_ratio']:.3f}** (range "
              f"{m['ratio_range'][0]:.3f}–{m['ratio_range'][1]:.3f}) |\n",
              f"The served encoder (one replica of 1 CPU on the same in-process Ray; load average "
              f"{serve_load[0]:.2f} after): latency of one JPEG request at a time over 200 requests, throughput of "
              f"16 concurrent clients over 800 requests.\n",
              "| max_batch_size | p50 latency, ms | p95 latency, ms | 16 clients, images/s |", "|---|---|---|---|"]
    lines += [f"| {r['max_batch_size']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['concurrent16_img_s']:.1f} |"
              for r in serve_rows]
    with open(REPO / "docs" / "benchmarks.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("appended to docs/benchmarks.md", file=sys.stderr)


def scaling(args, encoder, images, plan_args: dict, work: Path) -> None:
    """Part 3: 1 vs 2 encoder actors on a loopback two-node cluster of one CPU per node."""
    import ray
    from ray.cluster_utils import Cluster

    from byol_ray.downstream.embed import EmbedSettings

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback addresses
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        one = EmbedSettings(batch_size=args.batch_size, concurrency=1, progress_every_s=1e9)
        two = EmbedSettings(batch_size=args.batch_size, concurrency=2, progress_every_s=1e9)
        load_start = os.getloadavg()  # before the warm-up: how quiet the machine was
        ray_path(encoder, images, plan_args, two, work / "scale-warm")
        rounds = []
        for r in range(args.rounds):
            a = len(images) / ray_path(encoder, images, plan_args, one, work / f"scale{r}-1")
            b = len(images) / ray_path(encoder, images, plan_args, two, work / f"scale{r}-2")
            rounds.append((a, b))
            print(f"round {r + 1}: 1 actor {a:.1f} img/s, 2 actors on 2 nodes {b:.1f} img/s, ratio {b / a:.3f}",
                  flush=True)
        load_end = os.getloadavg()
    finally:
        ray.shutdown()
        cluster.shutdown()
    ratios = [b / a for a, b in rounds]
    med = statistics.median
    print(json.dumps({"one": med(a for a, _ in rounds), "two": med(b for _, b in rounds), "median_ratio": med(ratios),
                      "range": [min(ratios), max(ratios)], "load_start": load_start, "load_end": load_end}))
    if not args.write:
        return
    lines = [f"\n## Embeddings: scaling with encoder actors on a two-node loopback cluster ({time.strftime('%Y-%m-%d')})\n",
             f"`.venv/bin/python scripts/bench_embed.py --scaling --images {len(images)} --rounds {args.rounds} "
             f"--write`: a head and a second node (separate raylets) of 1 CPU each on the 2-core machine; "
             f"`run_embed` on {len(images)} real CIFAR-10 JPEGs, {args.encoder} at 32 px, batch {args.batch_size}, "
             f"with 1 encoder actor (one node) and with 2 (one per node), {args.rounds} interleaved paired rounds "
             f"after a warm-up; load average {load_start[0]:.2f} before the warm-up, {load_end[0]:.2f} at end (1 min). The two "
             f"nodes share the machine's two cores, so 2.0x is the ceiling.\n",
             "| round | 1 actor, images/s | 2 actors on 2 nodes, images/s | ratio |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {a:.1f} | {b:.1f} | {b / a:.3f} |" for i, (a, b) in enumerate(rounds)]
    lines += [f"| **median** | {med(a for a, _ in rounds):.1f} | {med(b for _, b in rounds):.1f} | "
              f"**{med(ratios):.3f}** (range {min(ratios):.3f}–{max(ratios):.3f}) |"]
    with open(REPO / "docs" / "benchmarks.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("appended to docs/benchmarks.md", file=sys.stderr)


if __name__ == "__main__":
    main()
