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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, s3_local
import harness  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    bench = harness.Bench("bench_staging.py", argv, args)
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
    with local_s3() as (endpoint, bucket):
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        client.upload_file(str(source), bucket, "data/train.beton")
        client.put_object(Bucket=bucket, Key="data/train.beton.json", Body=json.dumps(manifest).encode())
        remote = uri(endpoint, bucket, "data/train.beton")

        def staged(r):  # A: stage from the bucket into an empty cache folder
            cache = tmp / f"cache-{r}"
            start = time.perf_counter()
            local = stage(remote, cache, "data.train", progress=False)
            seconds = time.perf_counter() - start
            assert Path(local).stat().st_size == size
            shutil.rmtree(cache)
            return seconds

        def copied(r):  # B: a plain local copy into a fresh folder
            copy_to = tmp / f"copy-{r}"
            copy_to.mkdir()
            start = time.perf_counter()
            shutil.copyfile(source, copy_to / "train.beton")
            seconds = time.perf_counter() - start
            shutil.rmtree(copy_to)
            return seconds

        done = harness.interleaved({"stage_s": staged, "copy_s": copied}, args.rounds, warmup=1)
    bench.end()
    shutil.rmtree(tmp)
    med = {k: done.median(k) for k in ("stage_s", "copy_s")}
    paired = done.paired("stage_s", "copy_s")
    summary = {"size_mib": size / 2**20, "rounds": len(done.rows), "median": med,
               "ratio_stage_over_copy": paired["median_ratio"], "ratios": paired["ratios"],
               "stage_mib_per_s": size / 2**20 / med["stage_s"], "copy_mib_per_s": size / 2**20 / med["copy_s"],
               "per_round": [{"stage_s": r["stage_s"], "copy_s": r["copy_s"]} for r in done.rows]}
    bench.finish(summary)
    print(json.dumps(summary, indent=2))
    per_round = ", ".join(f"{r['stage_s']:.1f} / {r['copy_s']:.1f} s" for r in summary["per_round"])
    body = (
        f"A {summary['size_mib']:.0f} MiB `.beton` (random bytes) in an S3-compatible server on loopback (moto), "
        f"{len(done.rows)} interleaved paired rounds after a warm-up.\n\n"
        + harness.markdown_table(["per file (median)", "time", "MiB/s"], [
            ["`stage` from the bucket: streamed download + sha256 + check against the manifest",
             f"{med['stage_s']:.1f} s", f"{summary['stage_mib_per_s']:.0f}"],
            ["plain local copy (`shutil.copyfile`, no checksum)", f"{med['copy_s']:.1f} s",
             f"{summary['copy_mib_per_s']:.0f}"]])
        + f"\n\nMedian paired ratio stage / local copy: **{paired['median_ratio']:.2f}×** (per round: {per_round}). "
        "moto keeps objects in its own process's memory and shares the cores with the copy; a real store's figure "
        "depends on its network. A node stages once; later runs and restarts on it reuse the copy.")
    bench.write_section("staging-object-store", f"Staging a training file from an object store ({bench.date})", body,
                        question="What does staging data from an object store cost?",
                        summary=f"{summary['size_mib'] / 1024:g} GiB from an S3 server on loopback (moto) in "
                                f"{med['stage_s']:.1f} s with sha256 verification, once per node; a page-cache local "
                                f"copy {med['copy_s']:.2f} s ({paired['median_ratio']:.1f}×, median of "
                                f"{len(done.rows)} paired rounds)")
    return summary


if __name__ == "__main__":
    main()
