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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # harness, s3_local
import harness  # noqa: E402


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
    index = 0

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
    sys.path.insert(0, config["scripts"])  # the harness, in this Ray worker process too
    from harness import interleaved

    def arm(mode):
        def run(_round):
            out = checkpoint(mode)
            time.sleep(config["gap_s"])
            return out
        return run

    # one warm-up round (imports, first upload), then SYNC, ASYNC, SYNC, ... in paired rounds
    done = interleaved({"sync": arm(CheckpointUploadMode.SYNC), "async": arm(CheckpointUploadMode.ASYNC)},
                       config["rounds"], warmup=1, log=lambda line: print(line, flush=True))
    rows = [{"sync": row["sync"], "async": row["async"]} for row in done.rows]
    polls = []
    for _ in range(config["polls"]):
        start = time.perf_counter()
        ray.train.get_preemption_info()
        polls.append(time.perf_counter() - start)
    out = {"rows": rows, "poll_s": polls, "state_bytes": sizes[0], "online_target_params": params}
    Path(config["out"]).write_text(json.dumps(out))


def section(summary: dict, args) -> dict:
    """The docs section of a run (harness.Bench.write_section's arguments)."""
    med, ratio, poll_ms, rows = summary["median"], summary["stall_ratio_sync_over_async"], summary["poll_ms"], \
        summary["rows"]
    per_round = ", ".join(f"{r['sync']['stall_s']:.2f} / {r['async']['stall_s']:.2f} s" for r in rows)
    where = "S3 on loopback" if args.s3 else "local disk" if not args.storage else "storage " + args.storage
    body = (
        f"One Ray Train CPU worker reports the real engine state of a ResNet-18 BYOL run ({summary['state_mb']:.0f} "
        f"MB: {summary['online_target_params_m']:.1f} M online + target parameters, LARS momentum, RNG) "
        f"{len(rows)} times per mode in interleaved paired rounds, {args.gap_s:g} s apart; storage "
        f"{summary['storage']}.\n\n"
        + harness.markdown_table(
            ["per checkpoint (median)", "save to local temp", "`report` returns after", "step loop stalled"],
            [[name, *(f"{med[m][k]:.2f} s" for k in ("save_s", "report_s", "stall_s"))]
             for name, m in (("SYNC upload", "sync"), ("ASYNC upload (`ray.checkpoint_upload=async`)", "async"))])
        + f"\n\nMedian paired ratio of the stall, sync / async: **{ratio:.2f}×** (per round: {per_round}). The "
        "serialisation to the local temporary folder is paid in both modes; the synchronous mode also waits for the "
        "copy to the storage.\n\n"
        f"`ray.train.get_preemption_info()` with one worker: median {poll_ms['median']:.2f} ms, 90th percentile "
        f"{poll_ms['p90']:.2f} ms over {summary['polls']} calls; polled every `ray.preemption_poll_steps` (default "
        f"10) steps, that is {poll_ms['median'] / 10:.2f} ms per step.")
    return dict(section_id="checkpoint-upload-s3" if args.s3 else "checkpoint-upload-local",
                title=f"Checkpoint upload: synchronous vs asynchronous, and the preemption poll ({where}, "
                      f"{time.strftime('%Y-%m-%d')})",
                question=f"Does a checkpoint stall training ({where})?", body=body,
                summary=f"{summary['state_mb']:.0f} MB ResNet-18 state to {summary['storage']}: "
                        f"{med['sync']['stall_s']:.2f} s stall sync, {med['async']['stall_s']:.2f} s async "
                        f"({ratio:.2f}×, median of {len(rows)} paired rounds); a preemption poll "
                        f"{poll_ms['median']:.2f} ms")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gap-s", type=float, default=4.0, help="idle seconds after each checkpoint")
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--storage", default="", help="Ray Train storage_path (default: a temporary folder)")
    parser.add_argument("--s3", action="store_true", help="store in an S3-compatible server started on loopback")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    bench = harness.Bench("bench_checkpoint.py", argv, args)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from byol_ray.ray_train import storage_args
    from byol_ray.storage import Location

    tmp = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    out = tmp / "result.json"
    with contextlib.ExitStack() as stack:
        storage = args.storage or str(tmp / "storage")
        if args.s3:
            from s3_local import local_s3, uri

            endpoint, bucket = stack.enter_context(local_s3())
            storage = uri(endpoint, bucket, "bench")
        ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="WARNING")
        if worker.__module__ != "__main__":  # imported, not run: Ray's workers cannot import this script
            ray.cloudpickle.register_pickle_by_value(sys.modules[worker.__module__])
        TorchTrainer(worker, train_loop_config={"rounds": args.rounds, "gap_s": args.gap_s, "polls": args.polls,
                                                "out": str(out), "scripts": str(HERE)},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="bench", **storage_args(Location(storage)))).fit()
        ray.shutdown()
    bench.end()
    result = json.loads(out.read_text())
    rows = result["rows"]
    med = {m: {k: statistics.median(r[m][k] for r in rows) for k in ("save_s", "report_s", "stall_s")}
           for m in ("sync", "async")}
    paired = harness.ratio_summary([r["sync"]["stall_s"] / r["async"]["stall_s"] for r in rows])
    polls = sorted(result["poll_s"])
    poll_ms = {"median": 1e3 * statistics.median(polls), "p90": 1e3 * polls[int(0.9 * len(polls))]}
    summary = {"rounds": len(rows), "gap_s": args.gap_s, "state_mb": result["state_bytes"] / 2**20,
               "online_target_params_m": result["online_target_params"] / 1e6, "median": med,
               "stall_ratio_sync_over_async": paired["median_ratio"], "stall_ratios": paired["ratios"],
               "poll_ms": poll_ms, "polls": len(polls), "rows": rows,
               "storage": "an S3 server on loopback (moto)" if args.s3 else args.storage or "local disk"}
    bench.finish(summary)
    print(json.dumps(summary, indent=2))
    bench.write_section(**section(summary, args))
    return summary


if __name__ == "__main__":
    main()
