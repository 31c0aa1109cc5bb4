"""The node-local data cache (``data.cache_dir``): files made or copied once per machine, under a file lock.

Two things land here: ``.beton`` files converted from a source folder on first use, and ``.beton`` files staged
from an object store (``data.train=s3://bucket/train.beton``), which FFCV then reads from local disk. In both
cases one process per machine does the work while the others wait on its progress (the growing temporary
file), not on a fixed timeout that a large file would exceed, and take over if it dies.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from byol_ray.config import ConfigError
from byol_ray.storage import Location, check_readable_file, free_bytes, redact
from byol_ray.progress import say

if TYPE_CHECKING:
    from byol_ray.config import Config

DISK_MARGIN = 256 * 2**20  # bytes left free beside a staged file
STORED_SIDE_RATIO = 384 / 224  # long side stored by an automatic conversion, per pixel of training resolution


def temp_name(out: Path, pid: int) -> Path:
    """The temporary file a producer of ``out`` writes (``.<name>.tmp-<pid>``; waiters watch it grow)."""
    return out.with_name(f".{out.name}.tmp-{pid}")


def once_per_machine(out: Path, produce: Callable[[], None], *, current: Callable[[], bool] | None = None,
                     stall_s: float = 600.0, poll_s: float = 2.0, what: str = "") -> Path:
    """Make ``out`` once on this machine: the first process to take the lock runs ``produce``, the rest wait.

    Args:
        out: the file to make; ``produce`` writes it via :func:`temp_name` and renames it into place.
        produce: makes ``out``; runs with the lock held.
        current: whether an existing ``out`` is still good (default: it exists).
        stall_s: a waiter gives up when the producer shows no progress for this long.
        poll_s: how often a waiter looks.
        what: the source, for messages.
    """
    current = current or out.exists
    out.parent.mkdir(parents=True, exist_ok=True)
    seen, last_change, last_say = -1, time.monotonic(), 0.0
    while not (out.exists() and current()):
        with open(out.with_name(f"{out.name}.lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process works on it: watch its progress
                size = sum(p.stat().st_size for p in out.parent.glob(f".{out.name}.tmp-*") if p.exists())
                now = time.monotonic()
                if size != seen:
                    seen, last_change = size, now
                elif now - last_change > stall_s:
                    raise TimeoutError(f"preparing {out} from {what} made no progress for {stall_s:.0f} s; remove "
                                       f"{out.name}.lock there if its process is gone")
                if now - last_say > 30:
                    say(f"waiting for another process to prepare {out.name} ({size / 2**20:.0f} MiB written)")
                    last_say = now
            else:
                if not (out.exists() and current()):  # the lock is ours and nobody finished: do it
                    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a dead producer's leftovers
                        stale.unlink(missing_ok=True)
                    produce()
                return out
        time.sleep(poll_s)
    return out


def _stamp(path: Path) -> Path:
    return path.with_name(f"{path.name}.source.json")


def stage(uri: str, cache_dir: str | Path, key: str, *, progress: bool | None = None) -> str:
    """A node-local copy of the object-store file ``uri`` (config key ``key``), copied once and verified.

    The copy lives in ``<cache_dir>/staged/<hash of the URI>/<file name>``; later runs and restarts on this node
    reuse it while the object's size and modification time are unchanged. The ``<file>.json`` that ``byol-ray
    prepare`` writes beside a .beton is copied too; its checksum (size and sha256) must match the copy, else the
    copy is discarded. A node whose disk cannot hold the file is refused before anything is copied.

    Returns:
        The local path.
    """
    source = Location(uri)
    size = check_readable_file(source, key)
    info = source._info()
    remote = {"uri": redact(uri), "size": size, "mtime": info.mtime.isoformat() if info.mtime else ""}
    folder = Path(cache_dir).expanduser() / "staged" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = folder / source.name
    # prepare's manifest: <file>.json, or for the held-out <stem>.val.beton the training file's <stem>.beton.json
    sidecars = [source.parent / f"{source.name}.json"]
    if source.name.endswith(".val.beton"):
        sidecars.append(source.parent / f"{source.name.removesuffix('.val.beton')}.beton.json")

    def current() -> bool:
        stamp = _stamp(local)
        if not stamp.is_file():
            return False
        saved = json.loads(stamp.read_text())
        return {k: saved.get(k) for k in remote} == remote and local.stat().st_size == size

    def produce() -> None:
        free = free_bytes(folder)
        if free < size + DISK_MARGIN:
            raise ConfigError(f"{key}={redact(uri)!r} is {size / 2**30:.2f} GiB but the node's cache disk "
                              f"({folder.parent}) has {free / 2**30:.2f} GiB free; set data.cache_dir=... to a "
                              "larger local disk or free space there")
        expected, manifest = None, None
        for sidecar in sidecars:
            if sidecar.is_file():
                manifest = json.loads(sidecar.read_text())
                expected = (manifest.get("checksums") or {}).get(source.name)
                break
        tmp = temp_name(local, os.getpid())
        digest = hashlib.sha256()
        bar = _bar(size, f"staging {source.name}", progress)
        start = time.monotonic()
        try:
            copied = source.download(tmp, progress=bar.update, digest=digest)
            bar.close()
            if copied != size:
                raise OSError(f"copied {copied} of {size} bytes of {redact(uri)} (the object changed or the "
                              "connection dropped); run again")
            if expected and (expected.get("size") != size or expected.get("sha256") != digest.hexdigest()):
                raise ConfigError(f"{key}={redact(uri)!r}: the copy's sha256 {digest.hexdigest()[:12]}... does not "
                                  f"match the {expected.get('sha256', '')[:12]}... recorded by `byol-ray prepare` in "
                                  f"{source.name}.json (a damaged or replaced upload); upload the file and its .json "
                                  "again")
            if manifest is not None:  # beside the copy, as beside the original: the data fingerprint reads it
                (folder / f"{local.name}.json").write_text(json.dumps(manifest, indent=1) + "\n")
            tmp.replace(local)
        finally:
            bar.close()
            tmp.unlink(missing_ok=True)
        _stamp(local).write_text(json.dumps({**remote, "sha256": digest.hexdigest(),
                                             "verified_against": "prepare manifest" if expected else "size only"}))
        seconds = time.monotonic() - start
        say(f"staged {redact(uri)} -> {local} ({size / 2**20:.0f} MiB in {seconds:.1f} s, "
            f"{'sha256 verified' if expected else 'size verified; no prepare manifest beside it'})")

    once_per_machine(local, produce, current=current, what=redact(uri))
    return str(local)


def _bar(total: int, desc: str, progress: bool | None):
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not show, file=sys.stderr)


def training_file(cfg: "Config") -> str:
    """The path a run's loader reads: the .beton itself, a node-local copy of one in an object store, or one
    prepared once into the cache.

    An object-store ``data.train`` (``s3://bucket/train.beton``) is copied once per node into ``data.cache_dir``
    and verified (:func:`stage`). With the FFCV loader a non-.beton source is converted on first use into
    ``data.cache_dir/<source>-<fingerprint>-<max side>px.beton``. Either happens once per machine, under a file
    lock, with a progress bar (:func:`once_per_machine`). With the torch and memory loaders a local source itself
    is returned.
    """
    from byol_ray.data import sources
    from byol_ray.storage import is_uri

    train = cfg.data.train
    if is_uri(train):
        return stage(train, cfg.data.cache_dir, "data.train")
    if cfg.data.loader in ("torch", "memory") or train.endswith(".beton"):
        return train
    fp = sources.fingerprint(train)
    stem = "demo" if train == "demo" else Path(train).name
    # stored long side: 384 px for 224-px training (the ImageNet trade, docs/benchmarks.md "Stored resolution
    # for ImageNet"), the same ratio for other resolutions; FFCV never enlarges, so CIFAR stays 32x32
    max_resolution = max(round(cfg.data.resolution * STORED_SIDE_RATIO), 32)
    out = Path(cfg.data.cache_dir) / f"{stem}-{fp['sha256'][:12]}-{max_resolution}px.beton"

    def convert() -> None:
        from byol_ray.data import prepare as prep

        say(f"preparing {train} -> {out} (once; later runs reuse it)")
        prep.prepare(train, str(out), max_resolution=max_resolution, progress=sys.stderr.isatty())

    return str(once_per_machine(out, convert, what=train))
