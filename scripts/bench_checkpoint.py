"""How long a checkpoint stalls the step loop, synchronous vs asynchronous upload; what a preemption poll costs.

Inside one real Ray Train worker (a local cluster, 1 worker, CPU) this builds the real engine state of a
ResNet-18 BYOL run (online + target networks, projector and predictor at the paper's 4096/256 widths, LARS
momentum, RNG state: ``BYOLEngine.state_dict()``) and reports it as a checkpoint the way ``RayReporter``
does: ``save_checkpoint(durable=False)`` into a local temporary folder, then ``ray.train.report`` with
``CheckpointUploadMode.SYNC`` or ``ASYNC``. The stall is the wall time from the start of the save to the
return of ``report`` (what the step loop waits for); ``--gap-s`` of idle time separates checkpoints, as
training steps would. Modes alternate in paired rounds (SYNC, ASYNC, SYNC, ...) in the same worker; reported:
medians, the median of the paired ratios, and the load average.

The storage is ``--storage`` (default: a folder on this machine's disk), or with ``--s3`` an S3-compatible
server (moto) that the script starts on loopback: there the synchronous upload is a network transfer.

Then it times ``ray.train.get_preemption_info()`` (a collective call through Ray Train's synchronisation actor)
``--polls`` times, the cost that ``ray.preemption_poll_steps`` spreads over that many steps.

    .venv/bin/python scripts/bench_checkpoint.py --rounds 5 [--s3] [--write]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # s3_local

ROOT = Path(__file__).resolve().parents[1]


def worker(config: dict) -> None:
    import shutil

    import ray.train
    import torch
    from ray.train import CheckpointUploadMode

    from byol_ray.checkpoint import CHECKPOINT_NAME, save_checkpoint
    from byol_ray.config import derive, load_config
    from byol_ray.engine import BYOLEngine

    torch.set_num_threads(1)
    cfg = load_config(["cifar10_resnet18"], ["model.projector_hidden_dim=4096", "model.predictor_hidden_dim=4096",
                                             "model.projector_dim=256", "mlflow.enabled=false"])
    engine = BYOLEngine(cfg, derive(cfg, 50_000, 1), torch.device("cpu"))
    for group in engine.optimizer.param_groups:  # LARS momentum buffers exist after a first step: make them
        for p in group["params"]:
            engine.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    state = engine.state_dict()
    params = sum(t.numel() for part in ("online", "target") for t in state[part].values())
    rows, index = [], 0

    def checkpoint(mode: CheckpointUploadMode) -> float:
        nonlocal index
        start = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="bench-ckpt-")
        save_checkpoint(state, Path(tmp) / CHECKPOINT_NAME, durable=False)  # as RayReporter stages it
        saved = time.perf_counter()
        sizes.append((Path(tmp) / CHECKPOINT_NAME).stat().st_size)
        ray.train.report({"index": index}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"ckpt_{index:04d}", checkpoint_upload_mode=mode)
        end = time.perf_counter()
        if mode is CheckpointUploadMode.SYNC:
            shutil.rmtree(tmp, ignore_errors=True)
        index += 1
        return {"save_s": saved - start, "report_s": end - saved, "stall_s": end - start}

    sizes: list[int] = []
    for r in range(config["rounds"] + 1):  # round 0 warms up (imports, first upload)
        row = {}
        for name, mode in (("sync", CheckpointUploadMode.SYNC), ("async", CheckpointUploadMode.ASYNC)):
            row[name] = checkpoint(mode)
            time.sleep(config["gap_s"])
        if r:
            rows.append(row)
            print(json.dumps({"round": r, **row}), flush=True)
    polls = []
    for _ in range(config["polls"]):
        start = time.perf_counter()
        ray.train.get_preemption_info()
        polls.append(time.perf_counter() - start)
    out = {"rows": rows, "poll_s": polls, "state_bytes": sizes[0], "online_target_params": params}
    Path(config["out"]).write_text(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gap-s", type=float, default=4.0, help="idle seconds after each checkpoint")
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--storage", default="", help="Ray Train storage_path (default: a temporary folder)")
    parser.add_argument("--s3", action="store_true", help="store in an S3-compatible server started on loopback")
    parser.add_argument("--write", action="store_true", help="append the figures to docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from byol_ray.ray_train import storage_args
    from byol_ray.storage import Location

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    out = tmp / "result.json"
    with contextlib.ExitStack() as stack:
        storage = args.storage or str(tmp / "storage")
        if args.s3:
            from s3_local import local_s3, uri

            endpoint, bucket = stack.enter_context(local_s3())
            storage = uri(endpoint, bucket, "bench")
        ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="WARNING")
        TorchTrainer(worker, train_loop_config={"rounds": args.rounds, "gap_s": args.gap_s, "polls": args.polls,
                                                "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="bench", **storage_args(Location(storage)))).fit()
        ray.shutdown()
    result = json.loads(out.read_text())
    rows = result["rows"]
    med = {m: {k: statistics.median(r[m][k] for r in rows) for k in ("save_s", "report_s", "stall_s")}
           for m in ("sync", "async")}
    ratio = statistics.median(r["sync"]["stall_s"] / r["async"]["stall_s"] for r in rows)
    polls = sorted(result["poll_s"])
    poll_ms = {"median": 1e3 * statistics.median(polls), "p90": 1e3 * polls[int(0.9 * len(polls))]}
    load = os.getloadavg()
    per_round = ", ".join(f"{r['sync']['stall_s']:.2f} / {r['async']['stall_s']:.2f} s" for r in rows)
    summary = {"rounds": len(rows), "gap_s": args.gap_s, "state_mb": result["state_bytes"] / 2**20,
               "online_target_params_m": result["online_target_params"] / 1e6, "median": med,
               "stall_ratio_sync_over_async": ratio, "poll_ms": poll_ms, "loadavg_start": load_start,
               "loadavg_end": load, "storage": "an S3 server on loopback (moto)" if args.s3
               else args.storage or "local disk"}
    print(json.dumps(summary, indent=2))
    if args.write:
        with open(ROOT / "docs" / "benchmarks.md", "a") as fh:
            fh.write(
                f"\n## Checkpoint upload: synchronous vs asynchronous, and the preemption poll "
                f"({time.strftime('%Y-%m-%d')})\n\n"
                f"`.venv/bin/python scripts/bench_checkpoint.py --rounds {args.rounds}{' --s3' if args.s3 else ''} "
                f"--write` — one Ray Train CPU "
                f"worker reports the real engine state of a ResNet-18 BYOL run ({summary['state_mb']:.0f} MB: "
                f"{summary['online_target_params_m']:.1f} M online + target parameters, LARS momentum, RNG) "
                f"{len(rows)} times per mode in interleaved paired rounds, {args.gap_s:g} s apart; storage "
                f"{summary['storage']}; load average {load_start[0]:.2f} at start, {load[0]:.2f} at end (1 min).\n\n"
                f"| per checkpoint (median) | save to local temp | `report` returns after | step loop stalled |\n"
                f"|---|---|---|---|\n"
                f"| SYNC upload | {med['sync']['save_s']:.2f} s | {med['sync']['report_s']:.2f} s | "
                f"{med['sync']['stall_s']:.2f} s |\n"
                f"| ASYNC upload (`ray.checkpoint_upload=async`) | {med['async']['save_s']:.2f} s | "
                f"{med['async']['report_s']:.2f} s | {med['async']['stall_s']:.2f} s |\n\n"
                f"Median paired ratio of the stall, sync / async: **{ratio:.2f}×** (per round: "
                f"{per_round}). The serialisation to the local temporary folder is paid in both modes; the "
                f"synchronous mode also waits for the copy to the storage.\n\n"
                f"`ray.train.get_preemption_info()` with one worker: median {poll_ms['median']:.2f} ms, 90th "
                f"percentile {poll_ms['p90']:.2f} ms over {len(polls)} calls; polled every "
                f"`ray.preemption_poll_steps` (default 10) steps, that is {poll_ms['median'] / 10:.2f} ms per "
                f"step.\n")


if __name__ == "__main__":
    main()
