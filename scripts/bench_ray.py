"""Benchmark: Ray Train overhead (1 worker vs the plain engine) and 2-worker vs 1-worker throughput, CPU.

Usage:  .venv/bin/python scripts/bench_ray.py [--epochs 10] [--rounds 2] [--no-two-workers] [--write]
Steady state = mean images/s of the epochs after the first (the first pays FFCV compilation and
start-up). All three runs use the same config, data (.beton of the built-in digits) and seed, in
this one script; each run is the real code path (`fit` in-process, `launch` under Ray).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep the local Ray on loopback

from byol_ray.config import derive, load_config  # noqa: E402
from byol_ray.engine import fit  # noqa: E402
from byol_ray.run import build_train_loader, read_history, resolve_paths, run_dir, training_file  # noqa: E402

OVERRIDES = ["model.projector_hidden_dim=512", "model.predictor_hidden_dim=512", "train.batch_size=128",
             "train.checkpoint_every_epochs=100", "mlflow.enabled=false", "train.log_every_steps=1000"]


def steady(history: list[dict]) -> float:
    return statistics.mean(h["images_per_s"] for h in history[1:])


def plain_run(common: list[str], name: str) -> dict:
    """The engine in this process (2 threads: what one Ray worker with 2 CPUs gets)."""
    torch.set_num_threads(2)
    cfg = resolve_paths(load_config(["demo"], [*common, f"run_name={name}"]))
    loader = build_train_loader(cfg, training_file(cfg), torch.device("cpu"))
    start = time.perf_counter()
    result = fit(cfg, derive(cfg, loader.num_samples, 1), loader, torch.device("cpu"))
    return {"images_per_s": steady(result.history), "wall_s": time.perf_counter() - start}


def ray_run(common: list[str], name: str, extra: list[str]) -> dict:
    from byol_ray.ray_train import launch

    cfg = resolve_paths(load_config(["demo"], [*common, f"run_name={name}", *extra]))
    start = time.perf_counter()
    launch(cfg)
    return {"images_per_s": steady(read_history(run_dir(cfg))), "wall_s": time.perf_counter() - start}


def daemon_cpu_share(seconds: float = 10.0) -> float:
    """CPU seconds per second used by Ray's own processes (raylet, GCS, dashboard, agents) while idle."""
    import psutil

    procs = [p for p in psutil.process_iter(["name", "cmdline"])
             if any(k in " ".join(p.info["cmdline"] or []) for k in ("raylet", "gcs_server", "dashboard", "ray::", "log_monitor"))]
    def total():
        out = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                out += t.user + t.system
            except psutil.Error:
                pass
        return out
    before = total()
    time.sleep(seconds)
    return (total() - before) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every run")
    p.add_argument("--worker-niceness", type=int, default=None,
                   help="start the local Ray with RAY_worker_niceness=N (Ray's default starts workers at nice 15)")
    p.add_argument("--no-two-workers", action="store_true",
                   help="skip the 2-worker run (more rounds of the overhead comparison in the same time)")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    import ray

    from byol_ray.ray_train import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="byol-bench-ray-"))
    common = [*OVERRIDES, f"train.epochs={args.epochs}", f"output_dir={tmp}/runs", f"ray.storage_path={tmp}/ray",
              f"data.cache_dir={tmp}/cache"]
    names = ["plain_engine", "plain_engine_ray_idle", "ray_1_worker"] + ([] if args.no_two_workers else ["ray_2_workers"])
    runs: dict[str, list[dict]] = {k: [] for k in names}
    daemons = []
    for r in range(args.rounds):  # interleaved, so a slow spell of the machine hits every run alike
        runs["plain_engine"].append(plain_run(common, f"plain-{r}"))
        init_ray("")
        daemons.append(daemon_cpu_share())
        runs["plain_engine_ray_idle"].append(plain_run(common, f"plain-ray-idle-{r}"))
        runs["ray_1_worker"].append(ray_run(common, f"ray1-{r}", ["ray.num_workers=1", "ray.cpus_per_worker=2"]))
        if not args.no_two_workers:
            runs["ray_2_workers"].append(ray_run(common, f"ray2-{r}", ["ray.num_workers=2", "ray.cpus_per_worker=1"]))
        ray.shutdown()
    results = {k: {"images_per_s": statistics.median(x["images_per_s"] for x in v),
                   "per_round": [round(x["images_per_s"], 1) for x in v],
                   "wall_s": statistics.median(x["wall_s"] for x in v)} for k, v in runs.items()}
    ips = {k: v["images_per_s"] for k, v in results.items()}
    paired = [round(a["images_per_s"] / b["images_per_s"], 3) for a, b in zip(runs["ray_1_worker"], runs["plain_engine"])]
    out = {
        "benchmark": "ray_overhead", "epochs": args.epochs, "rounds": args.rounds, "batch": 128, "encoder": "tiny",
        "worker_niceness": args.worker_niceness if args.worker_niceness is not None else "ray default (15)",
        "data": "demo .beton", "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "ray_daemons_cpu_per_s": round(statistics.median(daemons), 3),
        "results": {k: {kk: (round(vv, 2) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in results.items()},
        "ray_1_worker_vs_plain": round(ips["ray_1_worker"] / ips["plain_engine"], 3),
        "ray_1_worker_vs_plain_per_round": paired,
        "ray_1_worker_vs_plain_median_of_rounds": round(statistics.median(paired), 3),
        "plain_ray_idle_vs_plain": round(ips["plain_engine_ray_idle"] / ips["plain_engine"], 3),
        "ray_1_worker_vs_plain_ray_idle": round(ips["ray_1_worker"] / ips["plain_engine_ray_idle"], 3),
    }
    if not args.no_two_workers:
        out["ray_2_workers_vs_1"] = round(ips["ray_2_workers"] / ips["ray_1_worker"], 3)
    print(json.dumps(out, indent=2))
    if args.write:
        lines = [
            f"\n## Ray Train overhead and 2 vs 1 workers (CPU, {time.strftime('%Y-%m-%d')}, interleaved)\n",
            f"Command: `.venv/bin/python scripts/bench_ray.py --epochs {args.epochs} --rounds {args.rounds}"
            f"{'' if args.worker_niceness is None else f' --worker-niceness {args.worker_niceness}'}"
            f"{' --no-two-workers' if args.no_two_workers else ''} --write`. "
            f"Tiny encoder, global batch 128, built-in digits (.beton, FFCV loader), steady-state images/s = mean of "
            f"epochs 2..{args.epochs}, median over {args.rounds} interleaved rounds. {out['cpu_count']} cores; "
            f"load average at the end: {', '.join(f'{x:.2f}' for x in out['load_average'])}.\n",
            "| run | images/s (median) | per round | wall s |", "|---|---|---|---|",
            *[f"| {k} | {v['images_per_s']:.1f} | {v['per_round']} | {v['wall_s']:.1f} |" for k, v in results.items()],
            f"\n- Ray Train, 1 worker (2 CPUs) / plain engine (2 threads): **{out['ray_1_worker_vs_plain']}** (ratio of "
            f"medians); per round {paired}, median of the paired ratios **{out['ray_1_worker_vs_plain_median_of_rounds']}**.",
            f"- Plain engine while the in-process Ray cluster idles beside it / plain engine alone: "
            f"**{out['plain_ray_idle_vs_plain']}**; Ray's own processes used {out['ray_daemons_cpu_per_s']} CPU-seconds "
            "per second while idle (measured with psutil over 10 s).",
            f"- Ray Train 1 worker / plain engine with Ray idling: **{out['ray_1_worker_vs_plain_ray_idle']}** "
            "(what the Train worker itself costs).",
        ]
        if not args.no_two_workers:
            lines.append(f"- 2 workers (1 CPU each) / 1 worker (2 CPUs): **{out['ray_2_workers_vs_1']}** — the machine has "
                         "2 cores, so a second worker only splits them; the figure shows the cost of the DDP all-reduce, "
                         "not scaling.")
        with open(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
