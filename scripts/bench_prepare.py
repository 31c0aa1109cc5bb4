"""How long `byol-ray prepare` takes at ImageNet scale: images/s per writer process and peak memory, extrapolated.

Runs the real CLI (the venv's ``byol-ray prepare SRC OUT --num-workers N --max-resolution SIDE --quiet --json``) as a
subprocess on an ImageNet-like ImageFolder -- real CIFAR-10 JPEGs upscaled (PIL bicubic) to about 400x350 pixels,
the average size of a real ImageNet image, made by scripts/bench_resolution.py -- for each N in ``--workers``, in
interleaved rounds (1, 2, 1, 2, ...). Measured per run: wall time of the whole command (interpreter start and
imports included) and prepare's own time (the report's ``seconds``: check pass + write, after the folder is
listed), images/s by each, images/s per writer process, CPU
seconds of the process tree (``RUSAGE_CHILDREN``), and the peak memory of the process tree, polled every 0.2 s
with psutil: the sum of RSS (counts pages shared by the forked writers once per process) and, every fifth poll
(it costs more to read), the sum of PSS (shares them out; the better figure for "how much RAM does it need").

The extrapolation to 1.28 M images is exactly that -- an extrapolation from this measurement, assuming the
per-process rate of the largest N measured holds for C writer processes on a C-core machine; it is not a
measurement at that scale. It uses prepare's own time, so the fixed start-up (imports, listing) is left out.
Upscaled CIFAR JPEGs are smaller and smoother than photographs, so decoding the source costs less here than on
real ImageNet files; listing and reading from network storage are not measured either.

    .venv/bin/python scripts/bench_prepare.py --images 10000 --side 384 --rounds 2 [--write]

Prints a JSON summary; ``--write`` replaces its section of docs/benchmarks.md (scripts/harness.py).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_resolution as br  # noqa: E402
import harness  # noqa: E402

IMAGENET_TRAIN = 1_281_167  # images in the ImageNet-1k train split
PSS_EVERY = 5  # polls between PSS reads (RSS is read at every poll)


def byol_ray_exe() -> str:
    """The `byol-ray` entry point of the interpreter running this script (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "byol-ray"
    found = str(here) if here.is_file() else shutil.which("byol-ray")
    if not found:
        raise SystemExit("no byol-ray entry point beside this Python or on PATH; run with the venv's python")
    return found


def tree_memory(proc, pss: bool) -> tuple[int, int, int, int]:
    """(sum RSS, sum PSS or 0, largest single RSS, process count) of ``proc`` and its descendants, in bytes.

    PSS reads /proc/PID/smaps_rollup, which costs far more than RSS: ask for it every few polls only.
    """
    import psutil

    rss_sum = pss_sum = biggest = count = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0, 0
    for p in procs:
        try:
            info = p.memory_full_info() if pss else p.memory_info()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            info = p.memory_info()
        rss_sum += info.rss
        pss_sum += getattr(info, "pss", info.rss) if pss else 0
        biggest = max(biggest, info.rss)
        count += 1
    return rss_sum, pss_sum, biggest, count


def run_once(source: Path, out: Path, workers: int, side: int, poll_s: float = 0.2) -> dict:
    """One `byol-ray prepare` run: wall and CPU time, images/s, peak memory of the process tree."""
    import psutil

    cmd = [byol_ray_exe(), "prepare", str(source), str(out), "--num-workers", str(workers),
           "--max-resolution", str(side), "--jpeg-quality", "90", "--quiet", "--json", "--overwrite"]
    stdout, stderr = out.with_suffix(".stdout"), out.with_suffix(".stderr")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = {"rss": 0, "pss": 0, "max_process_rss": 0, "processes": 0}
    start = time.perf_counter()
    with open(stdout, "w") as so, open(stderr, "w") as se:
        child = subprocess.Popen(cmd, stdout=so, stderr=se)
        proc = psutil.Process(child.pid)
        polls = 0
        while child.poll() is None:
            rss, pss, biggest, count = tree_memory(proc, pss=polls % PSS_EVERY == 0)
            polls += 1
            peak = {"rss": max(peak["rss"], rss), "pss": max(peak["pss"], pss),
                    "max_process_rss": max(peak["max_process_rss"], biggest),
                    "processes": max(peak["processes"], count)}
            time.sleep(poll_s)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {child.returncode}):\n{stderr.read_text()[-3000:]}")
    result = json.loads(stdout.read_text())
    manifest = json.loads(Path(result["manifest_path"]).read_text())
    n = int(result["num_written"])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    mib = 1 << 20
    return {
        "workers": workers, "images": n, "wall_s": round(wall, 2), "prepare_s": manifest["seconds"],
        "images_per_s": round(n / wall, 1), "images_per_s_per_process": round(n / wall / workers, 1),
        "prepare_images_per_s": round(n / max(manifest["seconds"], 1e-9), 1),
        "prepare_images_per_s_per_process": round(n / max(manifest["seconds"], 1e-9) / workers, 1),
        "startup_s": round(wall - manifest["seconds"], 2),
        "cpu_s": round(cpu, 2), "images_per_cpu_s": round(n / max(cpu, 1e-9), 1),
        "peak_rss_mib": round(peak["rss"] / mib, 1), "peak_pss_mib": round(peak["pss"] / mib, 1),
        "peak_max_process_rss_mib": round(peak["max_process_rss"] / mib, 1), "peak_processes": peak["processes"],
        "load_1min": round(os.getloadavg()[0], 2), "command": shlex.join(cmd),
    }


def extrapolate(per_process: float, cores: list[int], machines: list[int], target: int) -> list[dict]:
    """Hours for ``target`` images at ``per_process`` images/s per writer, C writers per machine, M machines.

    An extrapolation: it assumes the per-process rate holds for C writers and that M machines split the work
    evenly (byol-ray prepare writes one file from one machine today; M > 1 needs a sharded prepare).
    """
    rows = [{"cores": 1, "machines": 1, "hours": round(target / per_process / 3600, 2)}]
    for c in cores:
        for m in machines:
            rows.append({"cores": c, "machines": m, "hours": round(target / (per_process * c * m) / 3600, 2)})
    return rows


def section(result: dict) -> dict:
    """The docs section of a run (harness.Bench.write_section's arguments)."""
    s, d, e = result["summary"], result["data"], result["extrapolation"]
    runs = harness.markdown_table(
        ["writer processes", "wall s (start-up s)", "images/s, whole command", "images/s, prepare's own time",
         "same, per process", "images per CPU-s", "peak RSS sum MiB", "peak PSS sum MiB", "largest process RSS MiB"],
        [[n, f"{r['wall_s']} ({r['startup_s']})", r["images_per_s"], r["prepare_images_per_s"],
          r["prepare_images_per_s_per_process"], r["images_per_cpu_s"], r["peak_rss_mib"], r["peak_pss_mib"],
          r["peak_max_process_rss_mib"]] for n, r in s.items()], ["r"] * 9)
    hours = harness.markdown_table(["cores per machine", "machines", "hours"],
                                   [[r["cores"], r["machines"], r["hours"]] for r in e["rows"]], ["r"] * 3)
    body = "\n\n".join([
        f"Data: {d['images']} real CIFAR-10 train JPEGs upscaled (PIL bicubic) to about 400x350 pixels (the average "
        f"size of a real ImageNet image; mean here {d['mean_size'][0]:.0f}x{d['mean_size'][1]:.0f}, "
        f"{d['mean_file_bytes'] / 1000:.0f} kB per source file), stored at a long side of {result['side']} px, "
        f"JPEG quality 90. Each run is the CLI as a subprocess (check pass + write); {result['rounds']} interleaved "
        "rounds, medians. Peak memory of the whole process tree, polled every 0.2 s.", runs,
        f"**Extrapolation, not a measurement**: {e['target_images']} images at {e['per_process_images_per_s']} "
        f"images/s per writer process (prepare's own time with {e['from_workers']} processes), assuming that rate "
        "holds for C writers on a C-core machine and that M machines split the work evenly (today one "
        "`byol-ray prepare` writes one file on one machine: M > 1 needs a sharded prepare). Source decoding of real "
        "photographs and reads from network storage cost more than here.", hours])
    rates = [r["prepare_images_per_s_per_process"] for r in s.values()]
    return dict(section_id="prepare-imagenet-like", body=body,
                title=f"Preparing ImageNet-like data: `byol-ray prepare` per writer process ({time.strftime('%Y-%m-%d')})",
                question="How long does `prepare` take at ImageNet scale?",
                summary=f"{min(rates):g}–{max(rates):g} images/s per writer process on upscaled CIFAR; an "
                        f"extrapolation, not a measurement, for {e['target_images'] / 1e6:.2f} M images")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", type=Path, default=br.CIFAR_ARCHIVE,
                        help="CIFAR-10 JPEG archive (train/<class>/*.jpg) or an unpacked train folder")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/byol-bench-prepare"))
    parser.add_argument("--images", type=int, default=10000, help="synthetic ImageNet-like images")
    parser.add_argument("--side", type=int, default=384, help="stored long side (--max-resolution)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="writer processes to compare")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median reported)")
    parser.add_argument("--target-images", type=int, default=IMAGENET_TRAIN)
    parser.add_argument("--cores", type=int, nargs="+", default=[32, 96], help="cores per machine (extrapolation)")
    parser.add_argument("--machines", type=int, nargs="+", default=[1, 4, 16], help="machines (extrapolation)")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    bench = harness.Bench("bench_prepare.py", argv, args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"side": args.side, "rounds": args.rounds}
    data = br.make_imagenet_like(args.cifar, args.work_dir / "imagenet-like", args.images)
    result["data"] = {k: v for k, v in data.items() if k != "shapes"}
    out = args.work_dir / f"imagenet-like-{args.side}.beton"
    done = harness.interleaved({str(n): (lambda r, n=n: run_once(Path(data["root"]), out, n, args.side))
                                for n in args.workers}, args.rounds)  # 1, 2, 1, 2, ...
    runs = {n: done.values(str(n)) for n in args.workers}
    keys = ("wall_s", "prepare_s", "startup_s", "images_per_s", "images_per_s_per_process", "prepare_images_per_s",
            "prepare_images_per_s_per_process", "cpu_s", "images_per_cpu_s", "peak_rss_mib", "peak_pss_mib",
            "peak_max_process_rss_mib")
    summary = {}
    for n, rs in runs.items():
        summary[str(n)] = {k: round(statistics.median(x[k] for x in rs), 2) for k in keys}
        summary[str(n)]["peak_processes"] = max(x["peak_processes"] for x in rs)
        summary[str(n)]["rounds_images_per_s"] = [x["images_per_s"] for x in rs]
    result["runs"] = {str(n): rs for n, rs in runs.items()}
    result["summary"] = summary
    top = str(max(args.workers))
    per_process = summary[top]["prepare_images_per_s_per_process"]
    result["extrapolation"] = {
        "label": "extrapolation from this measurement, not a measurement at this scale",
        "target_images": args.target_images, "from_workers": int(top), "per_process_images_per_s": per_process,
        "rows": extrapolate(per_process, args.cores, args.machines, args.target_images),
    }
    if "1" in summary and len(summary) > 1:
        result["scaling_efficiency"] = round(
            summary[top]["images_per_s"] / (int(top) * summary["1"]["images_per_s"]), 3)
    bench.finish(result)
    print(json.dumps(result, indent=1))
    bench.write_section(**section(result))
    return result


if __name__ == "__main__":
    main()
