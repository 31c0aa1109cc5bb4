"""Benchmark: Ray Train overhead (1 worker vs the plain engine) and 2-worker vs 1-worker throughput, CPU.

Usage:  .venv/bin/python scripts/bench_ray.py [--epochs 10] [--rounds 2] [--threads 2] [--no-two-workers] [--write]
Steady state = mean images/s of the epochs after the first (the first pays FFCV compilation and
start-up). All runs use the same config, data (.beton of the built-in digits) and seed, in this one
script; each run is the real code path (`fit` in-process, `launch` under Ray). ``--threads`` is both
the plain engine's torch thread count and the Ray worker's CPUs: 2 saturates this 2-core machine
(Ray's own processes then take cycles from training), 1 leaves a core to Ray's processes and the
loader thread, as a GPU node's spare cores do.

While each run trains, a sampler records the CPU seconds per second used by the process that trains
(this process, or the Train worker), by the other Ray processes (raylet, GCS, dashboard and agents,
the Train controller, log monitor) and by this driver process, so a slowdown can be traced to CPU
taken from training or to extra work in the training process itself (CPU-seconds per image).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep the local Ray on loopback
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from byol_ray.config import derive, load_config  # noqa: E402
from byol_ray.engine import Reporter, fit  # noqa: E402
from byol_ray.history import read_history  # noqa: E402
from byol_ray.data.cache import training_file  # noqa: E402
from byol_ray.data.loaders import run_loader  # noqa: E402
from byol_ray.run_folder import resolve_paths, run_dir  # noqa: E402

OVERRIDES = ["model.projector_hidden_dim=512", "model.predictor_hidden_dim=512", "train.batch_size=128",
             "train.checkpoint_every_epochs=100", "mlflow.enabled=false", "train.log_every_steps=1000"]


def steady(history: list[dict]) -> float:
    return statistics.mean(h["images_per_s"] for h in history[1:])


RAY_MARKERS = ("raylet", "gcs_server", "dashboard", "ray::", "log_monitor", "runtime_env", "ray/_private")


class CpuSampler:
    """CPU time of the processes involved in a run, snapshotted at every epoch end.

    Groups: ``train_worker`` (Ray Train workers), ``ray_other`` (every other Ray process: raylet, GCS,
    dashboard and agents, the Train controller, log monitor) and ``driver`` (this process). Ray processes
    are found, and named by their current process title (an idle worker becomes a Train worker), every
    ``rescan_s``; epoch ends are either marked by the caller (:meth:`mark`) or seen as new lines of the
    run's ``metrics.jsonl`` (polled every 0.1 s). The steady state is the span from the first epoch's end
    to the last one's, as for images/s.
    """

    def __init__(self, history: Path | None = None, rescan_s: float = 2.0) -> None:
        import psutil

        self.psutil, self.history, self.rescan_s = psutil, history, rescan_s
        self.procs: dict[int, object] = {}  # pid -> psutil.Process
        self.names: dict[int, str] = {}  # pid -> short name at the latest scan
        self.first: dict[int, float] = {}  # pid -> its CPU seconds when first seen
        self.marks: list[tuple[float, float, dict[int, float]]] = []  # (time, driver CPU, {pid: CPU})
        self.lock = threading.Lock()

    def _rescan(self) -> None:
        # This process's descendants only: the local Ray it started (its daemons, and the workers its raylet
        # forks); another user's Ray on a shared machine is not this benchmark's cost.
        for p in self.psutil.Process().children(recursive=True):
            try:
                cmdline = p.cmdline()
            except self.psutil.Error:
                continue
            if not any(k in " ".join(cmdline) for k in RAY_MARKERS):
                continue
            self.names[p.pid] = _short_name(cmdline)
            if p.pid not in self.procs:
                self.procs[p.pid] = p
                self.first[p.pid] = self._cpu_of(p) or 0.0

    def _cpu_of(self, proc) -> float | None:
        try:
            t = proc.cpu_times()
        except self.psutil.Error:
            return None  # gone: what it used since the last snapshot is not counted
        return t.user + t.system

    def mark(self) -> None:
        with self.lock:
            pids = {pid: cpu for pid, proc in list(self.procs.items()) if (cpu := self._cpu_of(proc)) is not None}
            self.marks.append((time.perf_counter(), time.process_time(), pids))

    def __enter__(self):
        self._stop = threading.Event()
        self._rescan()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        last_rescan, seen = time.perf_counter(), 0
        while not self._stop.wait(0.1):
            if time.perf_counter() - last_rescan > self.rescan_s:
                self._rescan()
                last_rescan = time.perf_counter()
            if self.history is not None and self.history.exists():
                rows = self.history.read_bytes().count(b"\n")
                if rows > seen:
                    seen = rows
                    self.mark()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _per_process(self) -> tuple[float, dict[int, float]]:
        """CPU-seconds per second of this process, and of each Ray process, from the first mark to the last."""
        if len(self.marks) < 2:
            raise RuntimeError(f"saw {len(self.marks)} epoch end(s); the steady state needs train.epochs >= 2")
        (t0, d0, c0), (t1, d1, c1) = self.marks[0], self.marks[-1]
        span = t1 - t0
        # a process first seen after the span began counts from when it was first seen
        return (d1 - d0) / span, {pid: (cpu - c0.get(pid, self.first[pid])) / span for pid, cpu in c1.items()}

    def steady(self) -> dict[str, float]:
        """CPU-seconds per second of each group from the first epoch end to the last."""
        driver, per_pid = self._per_process()
        out = {"train_worker": 0.0, "ray_other": 0.0, "driver": driver}
        for pid, used in per_pid.items():
            out["train_worker" if "RayTrainWorker" in self.names[pid] else "ray_other"] += used
        return {k: round(v, 3) for k, v in out.items()}

    def by_process(self) -> dict[str, float]:
        """CPU-seconds per second of each kind of Ray process (summed over processes of one name), same span."""
        _, per_pid = self._per_process()
        out: dict[str, float] = {}
        for pid, used in per_pid.items():
            out[self.names[pid]] = out.get(self.names[pid], 0.0) + used
        return {k: round(v, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _short_name(cmdline: list[str]) -> str:
    """``ray::IDLE``, ``raylet``, ``dashboard.py``, ``agent.py`` ...: what a Ray process is, from its command line."""
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    scripts = [Path(a).name for a in cmdline if a.endswith(".py")]
    return scripts[0] if scripts else Path(cmdline[0]).name if cmdline else "?"


class _MarkEpochs(Reporter):
    """A reporter for the plain run that tells the sampler where epochs end."""

    def __init__(self, sampler: CpuSampler) -> None:
        self.sampler = sampler

    def log(self, metrics, step) -> None:
        pass

    def epoch_end(self, metrics, epoch, state) -> None:
        self.sampler.mark()


def _summary(history: list[dict], cpu: dict[str, float], training: str, wall: float) -> dict:
    steady_s = sum(h["epoch_time_s"] for h in history[1:])
    images = sum(h["images_per_s"] * h["epoch_time_s"] for h in history[1:])
    return {"images_per_s": steady(history), "wall_s": wall, "cpu_per_s": cpu,
            # CPU the training process spends per image (its own work, wherever its threads ran)
            "training_cpu_ms_per_image": round(1e3 * cpu[training] * steady_s / images, 3)}


def plain_run(common: list[str], name: str, threads: int) -> dict:
    """The engine in this process, with ``threads`` torch threads (what one Ray worker with as many CPUs gets)."""
    torch.set_num_threads(threads)
    cfg = resolve_paths(load_config(["demo"], [*common, f"run_name={name}"]))
    loader = run_loader(cfg, training_file(cfg), torch.device("cpu"))
    start = time.perf_counter()
    with CpuSampler() as cpu:
        result = fit(cfg, derive(cfg, loader.num_samples, 1), loader, torch.device("cpu"), reporter=_MarkEpochs(cpu))
    return _summary(result.history, cpu.steady(), "driver", time.perf_counter() - start)


def ray_run(common: list[str], name: str, extra: list[str]) -> dict:
    from byol_ray.ray_train import launch

    cfg = resolve_paths(load_config(["demo"], [*common, f"run_name={name}", *extra]))
    start = time.perf_counter()
    with CpuSampler(history=run_dir(cfg) / "metrics.jsonl") as cpu:
        launch(cfg)
    out = _summary(read_history(run_dir(cfg)), cpu.steady(), "train_worker", time.perf_counter() - start)
    return {**out, "cpu_per_s_by_process": cpu.by_process()}


def daemon_cpu_share(seconds: float = 10.0) -> tuple[float, dict[str, float]]:
    """CPU seconds per second used by Ray's own processes while idle: in all, and by kind of process."""
    with CpuSampler() as cpu:
        cpu.mark()
        time.sleep(seconds)
        cpu.mark()
    used = cpu.steady()
    return round(used["ray_other"] + used["train_worker"], 3), cpu.by_process()


def _median_cpu(rows: list[dict]) -> dict[str, float]:
    return {k: round(statistics.median(x["cpu_per_s"][k] for x in rows), 3) for k in rows[0]["cpu_per_s"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every run")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of the plain engine = CPUs of the 1-worker Ray run (2 fills this machine)")
    p.add_argument("--worker-niceness", type=int, default=None,
                   help="start the local Ray with RAY_worker_niceness=N (Ray's default starts workers at nice 15)")
    p.add_argument("--no-two-workers", action="store_true",
                   help="skip the 2-worker run (more rounds of the overhead comparison in the same time)")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="how long Ray's idle processes are sampled")
    p.add_argument("--overrides", nargs="*", default=[], help="extra config overrides for every run (tests: a tiny run)")
    harness.add_arguments(p)
    args = p.parse_args(argv)
    bench = harness.Bench("bench_ray.py", argv, args)
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    import ray

    from byol_ray.ray_connect import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="byol-bench-ray-"))
    common = [*OVERRIDES, f"train.epochs={args.epochs}", f"output_dir={tmp}/runs", f"ray.storage_path={tmp}/ray",
              f"data.cache_dir={tmp}/cache", *args.overrides]
    daemons, idle_by_process = [], {}
    started_ray = not ray.is_initialized()

    def ray_idle(r):  # start the local Ray, sample its idle processes, then the plain engine beside it
        nonlocal idle_by_process
        init_ray("")
        idle, idle_by_process = daemon_cpu_share(args.idle_seconds)
        daemons.append(idle)
        return plain_run(common, f"plain-ray-idle-{r}", args.threads)

    arms = {"plain_engine": lambda r: plain_run(common, f"plain-{r}", args.threads),
            "plain_engine_ray_idle": ray_idle,
            "ray_1_worker": lambda r: ray_run(common, f"ray1-{r}", ["ray.num_workers=1",
                                                                   f"ray.cpus_per_worker={args.threads}"])}
    if not args.no_two_workers:
        arms["ray_2_workers"] = lambda r: ray_run(common, f"ray2-{r}", ["ray.num_workers=2", "ray.cpus_per_worker=1"])
    # interleaved, so a slow spell of the machine hits every run alike
    done = harness.interleaved(arms, args.rounds, after_round=lambda r: started_ray and ray.shutdown(),
                               describe=lambda row: ", ".join(f"{k} {row[k]['images_per_s']:.1f} images/s"
                                                              for k in arms))
    bench.end()
    runs = {k: done.values(k) for k in arms}
    results = {k: {"images_per_s": statistics.median(x["images_per_s"] for x in v),
                   "per_round": [round(x["images_per_s"], 1) for x in v],
                   "wall_s": statistics.median(x["wall_s"] for x in v),
                   "training_cpu_ms_per_image": statistics.median(x["training_cpu_ms_per_image"] for x in v),
                   "cpu_per_s": _median_cpu(v)} for k, v in runs.items()}
    ips = {k: v["images_per_s"] for k, v in results.items()}
    paired = done.paired("ray_1_worker", "plain_engine", "images_per_s")
    out = {
        "benchmark": "ray_overhead", "epochs": args.epochs, "rounds": args.rounds, "threads": args.threads,
        "batch": 128, "encoder": "tiny",
        "worker_niceness": args.worker_niceness if args.worker_niceness is not None else "ray default (15)",
        "data": "demo .beton", "cpu_count": os.cpu_count(),
        "ray_daemons_cpu_per_s": round(statistics.median(daemons), 3),
        "ray_daemons_cpu_per_s_by_process_last_round": idle_by_process,
        "ray_1_worker_cpu_per_s_by_process_last_round": runs["ray_1_worker"][-1]["cpu_per_s_by_process"],
        "results": {k: {kk: (round(vv, 2) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in results.items()},
        "ray_1_worker_vs_plain": round(ips["ray_1_worker"] / ips["plain_engine"], 3),
        "ray_1_worker_vs_plain_per_round": paired["ratios"],
        "ray_1_worker_vs_plain_median_of_rounds": paired["median_ratio"],
        "plain_ray_idle_vs_plain": round(ips["plain_engine_ray_idle"] / ips["plain_engine"], 3),
        "ray_1_worker_vs_plain_ray_idle": round(ips["ray_1_worker"] / ips["plain_engine_ray_idle"], 3),
        "training_cpu_per_image_ray_vs_plain": round(results["ray_1_worker"]["training_cpu_ms_per_image"]
                                                     / results["plain_engine"]["training_cpu_ms_per_image"], 3),
    }
    if not args.no_two_workers:
        out["ray_2_workers_vs_1"] = round(ips["ray_2_workers"] / ips["ray_1_worker"], 3)
    bench.finish(out)
    print(json.dumps(out, indent=2))
    bench.write_section(**section(out, args))
    return out


def section(out: dict, args) -> dict:
    """The docs section of a run (harness.Bench.write_section's arguments)."""
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    rows = []
    for k, v in out["results"].items():
        c = v["cpu_per_s"]
        training = c["driver"] if k.startswith("plain") else c["train_worker"]
        rows.append([k, f"{v['images_per_s']:.1f}", v["per_round"], f"{v['training_cpu_ms_per_image']:.3f}", training,
                     c["ray_other"], "–" if k.startswith("plain") else c["driver"]])
    by_idle = ", ".join(f"{k} {v}" for k, v in out["ray_daemons_cpu_per_s_by_process_last_round"].items() if v >= 0.001)
    by_run = ", ".join(f"{k} {v}" for k, v in out["ray_1_worker_cpu_per_s_by_process_last_round"].items() if v >= 0.001)
    lines = [
        f"Tiny encoder, global batch 128, built-in digits (.beton, FFCV loader), steady-state images/s = mean of "
        f"epochs 2..{args.epochs}, median over {args.rounds} interleaved rounds; the plain engine runs "
        f"{args.threads} torch thread(s), the 1-worker Ray run gives its worker {args.threads} CPU(s)"
        + ("" if args.worker_niceness is None else f"; Ray workers at nice {args.worker_niceness}") + ". CPU columns: "
        "CPU-seconds per second over the same steady-state span (psutil), for the process that trains, the other Ray "
        "processes, and this driver.\n",
        harness.markdown_table(["run", "images/s (median)", "per round", "training CPU ms / image", "training CPU/s",
                                "other Ray CPU/s", "driver CPU/s"], rows) + "\n",
        f"- Ray Train, 1 worker / plain engine: **{out['ray_1_worker_vs_plain']}** (ratio of medians); per round "
        f"{out['ray_1_worker_vs_plain_per_round']}, median of the paired ratios "
        f"**{out['ray_1_worker_vs_plain_median_of_rounds']}**.",
        f"- Training CPU per image, Ray worker / plain engine: **{out['training_cpu_per_image_ray_vs_plain']}** (the "
        "work the training process itself does per image).",
        f"- Plain engine while the in-process Ray cluster idles beside it / plain engine alone: "
        f"**{out['plain_ray_idle_vs_plain']}**; Ray's own processes used {out['ray_daemons_cpu_per_s']} CPU-seconds "
        f"per second while idle (psutil over {args.idle_seconds:g} s); by process, last round: {by_idle}.",
        f"- Ray Train 1 worker / plain engine with Ray idling: **{out['ray_1_worker_vs_plain_ray_idle']}**.",
        f"- CPU-seconds per second by Ray process during the 1-worker run's steady state, last round: {by_run}.",
    ]
    if not args.no_two_workers:
        lines.append(f"- 2 workers (1 CPU each) / 1 worker: **{out['ray_2_workers_vs_1']}** — with 2 cores a second "
                     "worker only splits them; the figure shows the cost of the DDP all-reduce, not scaling.")
    nice = "" if args.worker_niceness is None else f"-nice-{args.worker_niceness}"
    return dict(section_id=f"ray-overhead-{threads.replace(' ', '-')}{nice}", body="\n".join(lines),
                title=f"Ray Train overhead{'' if args.no_two_workers else ' and 2 vs 1 workers'} (CPU, "
                      f"{time.strftime('%Y-%m-%d')}, {threads}"
                      + ("" if args.worker_niceness is None else f", Ray workers at nice {args.worker_niceness}") + ")",
                question=f"What does Ray Train cost ({threads}"
                         + ("" if args.worker_niceness is None else f", workers at nice {args.worker_niceness}") + ")?",
                summary=f"Ray Train 1 worker / plain engine: {out['ray_1_worker_vs_plain_median_of_rounds']} (median "
                        f"of {args.rounds} paired rounds; ratio of medians {out['ray_1_worker_vs_plain']}); plain "
                        f"engine with an idle Ray beside it {out['plain_ray_idle_vs_plain']}×")


if __name__ == "__main__":
    main()
