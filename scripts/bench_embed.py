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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="N: each round times N and 2N images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=2, help="encoder actors of the Ray Data path (1 CPU each)")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes of the plain loop")
    parser.add_argument("--serve-batch-sizes", default="1,8,32")
    parser.add_argument("--scaling", action="store_true", help="only part 3: 1 vs 2 actors on a two-node cluster")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    bench = harness.Bench("bench_embed.py", argv, args)  # the load before anything starts
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
        return scaling(args, bench, encoder, small, plan_args, work)
    init_ray()
    import ray

    settings = EmbedSettings(batch_size=args.batch_size, concurrency=args.concurrency, progress_every_s=1e9)
    # A then B on N images, then on 2N, in each round; one untimed warm-up round of both at N (worker processes,
    # imports, page cache)
    arms = {}
    for size, subset in (("N", small), ("2N", every)):
        arms[f"A_{size}"] = lambda r, subset=subset, size=size: (
            None if r < 1 and size == "2N" else ray_path(encoder, subset, plan_args, settings, work / f"round{r}-{size}"))
        arms[f"B_{size}"] = lambda r, subset=subset, size=size: (
            None if r < 1 and size == "2N" else plain_loop(encoder, root, subset.paths, resolution, args.batch_size,
                                                          args.loader_workers))

    def rates(row):
        return {p: {"whole": n / row[f"{p}_N"], "marginal": n / (row[f"{p}_2N"] - row[f"{p}_N"]),
                    "N": row[f"{p}_N"], "2N": row[f"{p}_2N"]} for p in "AB"}

    done = harness.interleaved(arms, args.rounds, warmup=1, describe=lambda row: (
        "Ray Data {A[whole]:.1f} img/s whole at N, {A[marginal]:.1f} marginal; plain loop {B[whole]:.1f} whole, "
        "{B[marginal]:.1f} marginal".format(**rates(row))))
    bench.end()
    rounds = [rates(row) for row in done.rows]
    med = statistics.median
    summary: dict = {"rounds": rounds}
    for key in ("whole", "marginal"):
        summary[key] = {"ray_data": med(row["A"][key] for row in rounds), "plain": med(row["B"][key] for row in rounds),
                        **harness.ratio_summary(row["A"][key] / row["B"][key] for row in rounds)}
    jpegs = [(root / p).read_bytes() for p in every.paths[:800]]
    summary["serve"] = serve_figures(store, info.uri, jpegs, [int(b) for b in args.serve_batch_sizes.split(",")],
                                     port=18265 + os.getpid() % 1000)
    summary["serve_load_after"] = harness.load_average()
    ray.shutdown()
    bench.finish(summary)
    print(json.dumps(summary, indent=1), flush=True)
    bench.write_section(**section(summary, args, resolution))
    return summary


def section(summary: dict, args, resolution: int) -> dict:
    """The docs section of part 1 and 2 (harness.Bench.write_section's arguments)."""
    n, w, m = args.images, summary["whole"], summary["marginal"]
    rows = [[i + 1, f"{r['A']['whole']:.1f}", f"{r['B']['whole']:.1f}", f"{r['A']['whole'] / r['B']['whole']:.3f}",
             f"{r['A']['marginal']:.1f}", f"{r['B']['marginal']:.1f}", f"{r['A']['marginal'] / r['B']['marginal']:.3f}"]
            for i, r in enumerate(summary["rounds"])]
    rows.append(["**median**", f"{w['ray_data']:.1f}", f"{w['plain']:.1f}", f"**{w['median_ratio']:.3f}**",
                 f"{m['ray_data']:.1f}", f"{m['plain']:.1f}", f"**{m['median_ratio']:.3f}** (range "
                 f"{m['ratio_range'][0]:.3f}–{m['ratio_range'][1]:.3f})"])
    serve = [[r["max_batch_size"], f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['concurrent16_img_s']:.1f}"]
             for r in summary["serve"]]
    body = "\n\n".join([
        f"Real CIFAR-10 test JPEGs, a {args.encoder} encoder (CIFAR stem, {resolution} px, random weights: the speed "
        f"does not depend on them), batch {args.batch_size}. A: `run_embed` on the embedded default's in-process Ray, "
        f"{args.concurrency} encoder actors of 1 CPU (on CPUs Ray Data fuses the decode into them), Parquet written. "
        f"B: a DataLoader with {args.loader_workers} decode processes and the model in the main process. Each of "
        f"{args.rounds} interleaved paired rounds times A and B on N = {n} and 2N = {2 * n} images, after one warm-up "
        "of each; whole = N / T(N), marginal = N / (T(2N) - T(N)), the rate once each path's fixed start-up is paid.",
        harness.markdown_table(["round", "A whole", "B whole", "A/B whole", "A marginal", "B marginal", "A/B marginal"],
                               rows),
        f"The served encoder (one replica of 1 CPU on the same in-process Ray; load average "
        f"{summary['serve_load_after'][0]:.2f} after): latency of one JPEG request at a time over 200 requests, "
        "throughput of 16 concurrent clients over 800 requests.",
        harness.markdown_table(["max_batch_size", "p50 latency, ms", "p95 latency, ms", "16 clients, images/s"], serve)])
    one = summary["serve"][0]
    return dict(section_id="embed-ray-data-vs-loop", body=body,
                title="Embeddings: `byol-ray embed` on Ray Data vs a plain DataLoader loop, and the served encoder "
                      f"({time.strftime('%Y-%m-%d')})",
                question="Embeddings: Ray Data vs a plain loop; the served encoder",
                summary=f"Ray Data path {w['median_ratio']:.2f}× the plain DataLoader loop's images/s per call of {n} "
                        f"images and {m['median_ratio']:.2f}× at the margin (median of {args.rounds} paired rounds, "
                        f"margin range {m['ratio_range'][0]:.2f}–{m['ratio_range'][1]:.2f}); served {args.encoder}: "
                        f"p50 {one['p50_ms']:.0f} ms per request, 16 clients "
                        + ", ".join(f"{r['concurrent16_img_s']:.0f}" for r in summary["serve"])
                        + " images/s at max_batch_size " + ", ".join(str(r["max_batch_size"]) for r in summary["serve"]))


def scaling(args, bench, encoder, images, plan_args: dict, work: Path) -> dict:
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
        # a warm-up round of the 2-actor run, then 1 actor, 2 actors, 1, 2, ... (images/s)
        done = harness.interleaved(
            {"one": lambda r: None if r < 1 else len(images) / ray_path(encoder, images, plan_args, one,
                                                                       work / f"scale{r}-1"),
             "two": lambda r: len(images) / ray_path(encoder, images, plan_args, two, work / f"scale{r}-2")},
            args.rounds, warmup=1)
        bench.end()
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = {"one": done.median("one"), "two": done.median("two"), "rounds": done.rows, **done.paired("two", "one")}
    bench.finish(out)
    print(json.dumps(out, indent=1))
    med, n = out, len(images)
    rows = [[r["round"], f"{r['one']:.1f}", f"{r['two']:.1f}", f"{r['two'] / r['one']:.3f}"] for r in done.rows]
    rows.append(["**median**", f"{med['one']:.1f}", f"{med['two']:.1f}", f"**{med['median_ratio']:.3f}** (range "
                 f"{med['ratio_range'][0]:.3f}–{med['ratio_range'][1]:.3f})"])
    body = (f"A head and a second node (separate raylets) of 1 CPU each on this machine; `run_embed` on {n} real "
            f"CIFAR-10 JPEGs, {args.encoder} at 32 px, batch {args.batch_size}, with 1 encoder actor (one node) and "
            f"with 2 (one per node), {args.rounds} interleaved paired rounds after a warm-up. The two nodes share the "
            "machine's cores, so 2.0x is the ceiling on a 2-core machine.\n\n"
            + harness.markdown_table(["round", "1 actor, images/s", "2 actors on 2 nodes, images/s", "ratio"], rows))
    bench.write_section("embed-scaling-two-nodes",
                        f"Embeddings: scaling with encoder actors on a two-node loopback cluster "
                        f"({time.strftime('%Y-%m-%d')})", body,
                        question="Embeddings: do encoder actors on two nodes scale?",
                        summary=f"on a two-node loopback cluster of 1 CPU per node, 2 actors (one per node) ran at "
                                f"{med['median_ratio']:.2f}× one actor (median of {args.rounds} paired rounds, range "
                                f"{med['ratio_range'][0]:.2f}–{med['ratio_range'][1]:.2f})")
    return out


if __name__ == "__main__":
    main()
