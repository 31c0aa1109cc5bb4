"""Staging a training file from an object store to a node's disk vs copying it from local disk.

A file of ``--size-mb`` MiB (random bytes named ``train.beton``: staging copies and checksums bytes, so their
content does not matter; the header check is skipped, the copy and its verification are what is timed) sits in
an S3-compatible server the script starts on loopback (moto), with a ``train.beton.json`` manifest that records
its size and sha256 as ``byol-ray prepare`` does. In interleaved paired rounds it times

  A. ``byol_ray.data.cache.stage`` into an empty cache folder: the streamed download with the sha256 computed
     on the way and checked against the manifest, under the file lock (what each node does once), and
  B. ``shutil.copyfile`` of the same file from this machine's disk into a fresh folder (the baseline: a plain
     local copy, no checksum),

and reports medians, the median of the paired ratios A/B and the load average.

    .venv/bin/python scripts/bench_staging.py --size-mb 1024 --rounds 5 [--write]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # s3_local

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="append the figures to docs/benchmarks.md")
    args = parser.parse_args()
    from s3_local import local_s3, uri

    from byol_ray.data.cache import stage

    tmp = Path(tempfile.mkdtemp(prefix="bench-staging-"))
    source = tmp / "train.beton"
    digest = hashlib.sha256()
    with open(source, "wb") as fh:
        for _ in range(args.size_mb):
            chunk = os.urandom(2**20)
            digest.update(chunk)
            fh.write(chunk)
    size = source.stat().st_size
    manifest = {"checksums": {"train.beton": {"size": size, "sha256": digest.hexdigest()}}}
    rows = []
    load_start = os.getloadavg()
    with local_s3() as (endpoint, bucket):
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        client.upload_file(str(source), bucket, "data/train.beton")
        client.put_object(Bucket=bucket, Key="data/train.beton.json", Body=json.dumps(manifest).encode())
        remote = uri(endpoint, bucket, "data/train.beton")
        for r in range(args.rounds + 1):  # round 0 warms up
            cache = tmp / f"cache-{r}"
            start = time.perf_counter()
            local = stage(remote, cache, "data.train", progress=False)
            staged = time.perf_counter() - start
            assert Path(local).stat().st_size == size
            shutil.rmtree(cache)
            copy_to = tmp / f"copy-{r}"
            copy_to.mkdir()
            start = time.perf_counter()
            shutil.copyfile(source, copy_to / "train.beton")
            copied = time.perf_counter() - start
            shutil.rmtree(copy_to)
            if r:
                rows.append({"stage_s": staged, "copy_s": copied})
                print(json.dumps({"round": r, **rows[-1]}), flush=True)
    shutil.rmtree(tmp)
    load = os.getloadavg()
    med = {k: statistics.median(r[k] for r in rows) for k in ("stage_s", "copy_s")}
    ratio = statistics.median(r["stage_s"] / r["copy_s"] for r in rows)
    summary = {"size_mib": size / 2**20, "rounds": len(rows), "median": med, "ratio_stage_over_copy": ratio,
               "stage_mib_per_s": size / 2**20 / med["stage_s"], "copy_mib_per_s": size / 2**20 / med["copy_s"],
               "loadavg_start": load_start, "loadavg_end": load}
    print(json.dumps(summary, indent=2))
    if args.write:
        per_round = ", ".join(f"{r['stage_s']:.1f} / {r['copy_s']:.1f} s" for r in rows)
        with open(ROOT / "docs" / "benchmarks.md", "a") as fh:
            fh.write(
                f"\n## Staging a training file from an object store ({time.strftime('%Y-%m-%d')})\n\n"
                f"`.venv/bin/python scripts/bench_staging.py --size-mb {args.size_mb} --rounds {args.rounds} --write` "
                f"— a {size / 2**20:.0f} MiB `.beton` (random bytes) in an S3-compatible server on loopback (moto), "
                f"{len(rows)} interleaved paired rounds; load average {load_start[0]:.2f} at start, "
                f"{load[0]:.2f} at end (1 min), 2 cores.\n\n"
                f"| per file (median) | time | MiB/s |\n|---|---|---|\n"
                f"| `stage` from the bucket: streamed download + sha256 + check against the manifest | "
                f"{med['stage_s']:.1f} s | {summary['stage_mib_per_s']:.0f} |\n"
                f"| plain local copy (`shutil.copyfile`, no checksum) | {med['copy_s']:.1f} s | "
                f"{summary['copy_mib_per_s']:.0f} |\n\n"
                f"Median paired ratio stage / local copy: **{ratio:.2f}×** (per round: {per_round}). moto keeps "
                f"objects in its own process's memory and shares the two cores with the copy; a real store's figure "
                f"depends on its network. A node stages once; later runs and restarts on it reuse the copy.\n")


if __name__ == "__main__":
    main()
