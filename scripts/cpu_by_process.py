"""Where a command's CPU goes on this machine: every process's CPU time, sampled from /proc, summed by kind.

    python scripts/cpu_by_process.py -- .venv/bin/python -m pytest -q -n 3 --dist loadgroup

Runs the command, reads every process's utime + stime (``/proc/PID/stat``) every 0.2 s until it exits, and prints
the CPU seconds of each kind of process (Ray Train workers, ``byol-ray`` commands, Ray's dashboards, ...), with the
machine's busy CPU time from ``/proc/stat`` over the same span. A process is counted up to its last sample, so one
that lives less than 0.2 s is missed; processes that were running before the command are counted from the start.
Linux only. docs/design.md ("The test suite") has the figures this measured.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
KINDS = [  # (substring of the command line, kind); the first that matches wins
    ("gcs_server", "ray: gcs"), ("raylet/raylet", "ray: raylet"), ("dashboard/agent", "ray: dashboard agent"),
    ("runtime_env/agent", "ray: runtime-env agent"), ("ray-dashboard-", "ray: dashboard"),
    ("dashboard.py", "ray: dashboard"), ("log_monitor", "ray: log monitor"), ("monitor.py", "ray: monitor"),
    ("default_worker.py", "ray: worker starting"), ("bin/byol-ray", "byol-ray command"),
    ("-m byol_ray", "byol-ray command"), ("huey", "mlflow server: job consumers"), ("uvicorn", "mlflow server"),
    ("bin/mlflow", "mlflow server"), ("mlflow.server", "mlflow server"), ("moto", "object store (moto)"),
    ("exec(eval(sys.stdin.readline()))", "pytest-xdist worker"), ("pytest", "pytest"), ("bin/ray ", "ray CLI"),
]


def kind_of(cmdline: str) -> str:
    if cmdline.startswith("ray::"):  # a Ray worker names itself after its actor or task
        return "ray::" + cmdline[5:].split()[0].split(".")[0][:40]
    return next((kind for needle, kind in KINDS if needle in cmdline), "other: " + cmdline[:50])


def busy_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / HZ  # all but idle and iowait


def sample(base: dict, last: dict, first: bool) -> None:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if not cmdline:  # kernel threads
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        key = (int(entry.name), fields[19])  # pid and start time: a reused pid is another process
        cpu = (int(fields[11]) + int(fields[12])) / HZ
        base.setdefault(key, cpu if first else 0.0)
        last[key] = (kind_of(cmdline), cpu - base[key])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    base, last = {}, {}
    sample(base, last, first=True)
    busy0, start = busy_seconds(), time.monotonic()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(base, last, first=False)
        time.sleep(0.2)
    sample(base, last, first=False)
    wall, busy = time.monotonic() - start, busy_seconds() - busy0
    me = os.getpid()
    totals, counts = collections.Counter(), collections.Counter()
    for (pid, _), (kind, cpu) in last.items():
        if pid != me and cpu > 0:
            totals[kind] += cpu
            counts[kind] += 1
    print(f"\n{' '.join(command)}: exit {proc.returncode}, {wall:.0f} s wall; the machine's busy CPU time {busy:.0f} s "
          f"({busy / wall:.2f} of {os.cpu_count()} cores), {sum(totals.values()):.0f} s of it seen by process",
          file=sys.stderr)
    for kind, cpu in totals.most_common():
        if cpu >= 1.0:
            print(f"{cpu:8.1f} s  {counts[kind]:4d}  {kind}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
