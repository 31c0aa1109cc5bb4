"""Converts a data source into FFCV .beton files: the only place that writes them."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from byol_ray.config import ConfigError
from byol_ray.data.check import require_ffcv
from byol_ray.data.sources import MAX_EXAMPLES, Source, open_source

MIN_PAGE_SIZE = 8 << 20  # FFCV's default page: every image must fit in one page
SMART_RAW_MAX_BYTES = 96 * 96 * 3  # compress_probability=None stores images up to ~96x96 raw
MAX_UNKNOWN_NAMES = 5  # unknown --label-subset names quoted in the error


class PrepareError(ConfigError, RuntimeError):
    """Bad input found before any image is decoded, or a conversion that failed part-way; either way
    nothing is left under the output name. One line naming the problem and the fix."""


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote."""

    path: Path
    num_written: int
    val_path: Path | None = None
    num_val: int = 0
    manifest_path: Path | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        val = f", {self.num_val} to {self.val_path}" if self.val_path else ""
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items() if v) or "none"
        return (f"wrote {self.num_written} images to {self.path}{val}; skipped: {skipped}; "
                f"report: {self.manifest_path}")


def stratified_sample(labels: np.ndarray, fraction: float, rng: np.random.Generator, *,
                      keep_one: bool) -> np.ndarray:
    """Positions of a seeded per-class sample: round(fraction * n_c) of each class, at least one.

    The draw behind ``prepare``'s val split and label fraction; downstream evaluation reuses it with the
    same seeds to pick the same images.

    Args:
        labels: int labels of the candidates.
        fraction: share of each class to pick.
        rng: the generator (seeded by the caller).
        keep_one: keep at least one sample of each class outside the sample (for a val split).

    Returns:
        Sorted int64 positions into ``labels``.
    """
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        k = max(1, int(round(fraction * len(members))))
        if keep_one:
            k = min(k, len(members) - 1)
        picked.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


_CHECK_SOURCE: Source | None = None  # set before forking the check pool, inherited by its workers


def _ignore_sigint() -> None:
    # A terminal's Ctrl-C reaches the whole process group: the main process alone handles it (it
    # terminates the workers); a worker dying of it mid-task would leave pools waiting on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Pool.terminate() ends workers with SIGTERM; a forked worker inherits the parent's Python handler for
    # it (a Ray driver installs one), which cannot run while the worker blocks on the task queue's lock:
    # the pool's exit would then wait forever. Workers die of SIGTERM, as a pool expects.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _forking():
    """Holds a Ctrl-C back while worker processes are forked, and delivers it right after.

    A signal arriving during a fork has its Python handler run inside the after-fork hooks
    (logging's lock release), which swallow the KeyboardInterrupt: the prepare would run on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives KeyboardInterrupt (and may set handlers)
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)  # now handled where it was sent: between our statements


def _check_one(index: int) -> str | None:
    return _CHECK_SOURCE.check(index)


def _check_all(source: Source, num_workers: int, progress: bool) -> list[str | None]:
    """Decode-checks every record (in parallel); returns None or the failure reason per record."""
    global _CHECK_SOURCE
    from tqdm import tqdm

    if not source.needs_check:
        return [None] * len(source)
    bar = dict(total=len(source), desc="checking images", disable=not progress, unit="img")
    if num_workers <= 1:
        return [source.check(i) for i in tqdm(range(len(source)), **bar)]
    _CHECK_SOURCE = source
    try:
        with _forking():
            pool = mp.get_context("fork").Pool(num_workers, initializer=_ignore_sigint)
        with pool:  # leaving it terminates the workers, on an interrupt too
            return list(tqdm(pool.imap(_check_one, range(len(source)), chunksize=64), **bar))
    finally:
        _CHECK_SOURCE = None


class _Samples:
    """What FFCV's writer workers index: source index -> (image, label)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __getitem__(self, index: int):
        return self.source.load(index), int(self.source.labels[index])


def _write_worker(errors, *args) -> None:
    _ignore_sigint()
    from ffcv.writer import worker_job_indexed_dataset

    try:
        worker_job_indexed_dataset(*args)
    except BaseException:
        errors.put(traceback.format_exc())
        sys.exit(1)


def _write_beton(path: Path, source: Source, order: np.ndarray, image_field: dict, num_workers: int,
                 progress: bool, desc: str) -> None:
    """Writes source[order] to `path` with FFCV's own worker job, but our own supervision.

    FFCV's DatasetWriter waits for a sample counter that a failed or killed worker never
    advances, so one bad record hangs it forever; here a worker failure ends the write with
    PrepareError, and a KeyboardInterrupt terminates the workers at once. The partial file is the
    caller's to delete.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    max_bytes = (image_field.get("max_resolution") or 0) ** 2 * 3
    page_size = max(MIN_PAGE_SIZE, 1 << int(max_bytes).bit_length())  # a raw image must fit one page
    ctx = mp.get_context("fork")  # workers inherit the source instead of pickling it
    writer = DatasetWriter(str(path), {"image": RGBImageField(**image_field), "label": IntField()},
                           page_size=page_size, num_workers=num_workers)
    writer.num_samples = n = len(order)
    work, allocations, errors = ctx.Queue(), ctx.Queue(), ctx.Queue()
    # Chunks the workers never take (an interrupt, a failure) must not hold the exit: the queue's
    # feeder thread would otherwise wait forever to flush them into a pipe nobody reads.
    work.cancel_join_thread()
    workers: list = []
    tables: list = []
    writer.prepare()  # header, field descriptors, shared-memory metadata table
    try:
        for chunk in chunks(list(enumerate(order.tolist())), 64):
            work.put(chunk)
        done = ctx.Value("Q", 0)
        allocator = MemoryAllocator(str(path), writer.data_region_start, writer.page_size)
        args = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, allocations,
                _Samples(source))
        workers = [ctx.Process(target=_write_worker, args=(errors, *args), daemon=True) for _ in range(num_workers)]
        for _ in workers:
            work.put(None)  # one stop token per worker
        with _forking():
            for w in workers:
                w.start()
        with tqdm(total=n, desc=desc, disable=not progress, unit="img") as bar:
            while len(tables) < len(workers):
                if not errors.empty():
                    raise PrepareError(f"writing {path.name} failed in a writer process:\n{errors.get()}")
                dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise PrepareError(f"a writer process for {path.name} died (exit code {dead[0]}; "
                                       "out of memory? try fewer num_workers)")
                bar.update(done.value - bar.n)
                try:
                    tables.append(allocations.get(timeout=0.1))
                except Exception:  # queue.Empty: keep supervising
                    pass
        for w in workers:
            w.join()
        writer.finalize([t for table in tables for t in table])
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
                w.join()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


def _image_field(max_resolution: int | None, jpeg_quality: int, compress_probability: float | None) -> dict:
    if compress_probability is None:
        mode = dict(write_mode="smart", smart_threshold=SMART_RAW_MAX_BYTES)
    elif compress_probability >= 1.0:
        mode = dict(write_mode="jpg")
    elif compress_probability <= 0.0:
        mode = dict(write_mode="raw")
    else:
        mode = dict(write_mode="proportion", compress_probability=float(compress_probability))
    return dict(max_resolution=max_resolution, jpeg_quality=int(jpeg_quality), **mode)


def _check_options(max_resolution, jpeg_quality, compress_probability, label_fraction, val_fraction, num_workers,
                   label_subset):
    problems = []
    if max_resolution is not None and not 8 <= max_resolution <= 65535:
        problems.append(f"max_resolution={max_resolution} (allowed: None or 8..65535 pixels)")
    if not 1 <= jpeg_quality <= 100:
        problems.append(f"jpeg_quality={jpeg_quality} (allowed: 1..100)")
    if compress_probability is not None and not 0.0 <= compress_probability <= 1.0:
        problems.append(f"compress_probability={compress_probability} (allowed: None or 0..1)")
    if label_fraction is not None and not 0.0 < label_fraction <= 1.0:
        problems.append(f"label_fraction={label_fraction} (allowed: None or (0, 1], e.g. 0.01 or 0.1)")
    if label_fraction is not None and label_subset is not None:
        problems.append("label_fraction and label_subset together (allowed: one of them)")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction={val_fraction} (allowed: [0, 1))")
    if num_workers < 1:
        problems.append(f"num_workers={num_workers} (allowed: >= 1)")
    if problems:
        raise PrepareError("prepare: bad option " + "; ".join(problems))


def _check_outputs(outputs: list[Path], overwrite: bool) -> None:
    """Output paths that can be written, checked before any image is decoded."""
    folder = outputs[0].parent
    if not folder.is_dir():
        raise PrepareError(f"output folder {folder} does not exist; create it first, or choose another output path")
    for path in outputs:
        if path.is_dir():
            raise PrepareError(f"output path {path} is a directory; give a file path, e.g. {path / 'train.beton'}")
    existing = [p for p in outputs if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True (--overwrite) to replace it, "
                              "or choose another output path")
    try:  # the write goes to a temporary file in the same folder, then os.replace
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".byol-ray-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PrepareError(f"output folder {folder} is not writable ({exc.strerror or exc}); choose a folder "
                           "you can write to") from None


def read_label_subset(path: str | Path) -> list[str]:
    """The image names of a label-subset list: one per line (ImageNet 1%/10% lists: ``n01440764_10026.JPEG``).

    Blank lines and lines starting with '#' are ignored; raises ConfigError for a missing or empty list.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PrepareError(f"label subset list {path} does not exist; give a file with one image name per line")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = list(dict.fromkeys(n for n in names if n and not n.startswith("#")))
    if not names:
        raise PrepareError(f"label subset list {path} names no images; give one image file name per line")
    return names


def label_subset_indices(source: Source, names: list[str]) -> np.ndarray:
    """Source indices of the listed images: a name matches a file's base name, or its path below the root.

    Args:
        source: an image folder (its files have names; CIFAR or in-memory sources do not).
        names: from :func:`read_label_subset`.

    Returns:
        Sorted int64 indices; raises ConfigError naming the first unknown or ambiguous names.
    """
    files = getattr(source, "files", None)
    if files is None:
        raise PrepareError(f"label_subset selects images by file name, and {source.name} has none; use "
                           "label_fraction, or prepare from an image folder")
    by_name: dict[str, list[int]] = {}
    for i, rel in enumerate(files):
        rel = Path(rel).as_posix()
        by_name.setdefault(rel, []).append(i)
        if "/" in rel:
            by_name.setdefault(rel.rsplit("/", 1)[1], []).append(i)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise PrepareError(f"label subset: {len(unknown)} of {len(names)} listed images are not in {source.root}, "
                           f"e.g. {unknown[:MAX_UNKNOWN_NAMES]}; check the list matches this source and split")
    ambiguous = [n for n in names if len(by_name[n]) > 1]
    if ambiguous:
        raise PrepareError(f"label subset: {len(ambiguous)} listed names match several files, e.g. "
                           f"{ambiguous[:MAX_UNKNOWN_NAMES]}; list them as paths below the root (class/name)")
    return np.array(sorted(by_name[n][0] for n in names), dtype=np.int64)


def file_checksum(path: str | Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file, read in 8 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 2**20):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def val_path_for(out_path: str | Path) -> Path:
    """Where the held-out split of `out_path` goes: train.beton -> train.val.beton."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.val{out.suffix}")


def prepare(source: str | Path | Source, out_path: str | Path, *, split: str = "train",
            max_resolution: int | None = None, jpeg_quality: int = 90,
            compress_probability: float | None = None, num_workers: int | None = None,
            label_fraction: float | None = None, label_subset: str | Path | None = None, val_fraction: float = 0.0,
            seed: int = 0, overwrite: bool = False, progress: bool = True) -> PrepareResult:
    """Writes a data source to an FFCV .beton with fields 'image' (RGBImageField) and 'label' (IntField).

    Unreadable images are skipped and counted; a JSON report `<out>.json` records the source
    fingerprint, counts, skip reasons, options and class names. Bad options, sources and output
    paths fail (ConfigError, one line) before any image is decoded. Outputs appear only when
    complete (temporary names, then os.replace); an interrupt (Ctrl-C) stops the worker processes
    and leaves no file behind.

    Args:
        source: 'demo', an ImageFolder folder, a CIFAR python folder, or a Source.
        out_path: the .beton to write.
        split: which split of a folder with split folders or CIFAR files.
        max_resolution: longest stored side; larger images are downscaled (FFCV: cv2 INTER_AREA).
        jpeg_quality: JPEG quality of compressed images.
        compress_probability: share of images stored as JPEG (the rest raw); None stores images
            of at most ~96x96 pixels raw and larger ones as JPEG.
        num_workers: reader/writer processes (default: the CPUs this process may use).
        label_fraction: keep only this class-stratified, seeded share of the training images
            (semi-supervised subsets: 0.01, 0.1).
        label_subset: instead of label_fraction, keep only the images a list file names, one file
            name per line (the standard ImageNet 1%/10% lists); unknown names are an error.
        val_fraction: class-stratified, seeded share held out into `<stem>.val<suffix>` (drawn before
            the label subset, so listed images drawn into it stay there).
        seed: seeds the val split, the label fraction and the stored order.
        overwrite: replace existing outputs instead of refusing.
        progress: show progress bars.

    Returns:
        PrepareResult with paths and counts.
    """
    num_workers = num_workers or len(os.sched_getaffinity(0))
    _check_options(max_resolution, jpeg_quality, compress_probability, label_fraction, val_fraction, num_workers,
                   label_subset)
    require_ffcv("train with data.loader=torch, which reads the source folder directly")
    out = Path(out_path).expanduser().resolve()
    val_out = val_path_for(out) if val_fraction > 0 else None
    manifest_out = out.with_name(out.name + ".json")
    _check_outputs([p for p in (out, val_out, manifest_out) if p is not None], overwrite)
    subset_names = read_label_subset(label_subset) if label_subset is not None else None
    src = open_source(source, split)
    subset = label_subset_indices(src, subset_names) if subset_names is not None else None

    started = time.time()
    reasons = _check_all(src, num_workers, progress)
    good = np.array([i for i, r in enumerate(reasons) if r is None], dtype=np.int64)
    bad = [(src.describe(i), r) for i, r in enumerate(reasons) if r is not None]
    if len(good) == 0:
        raise PrepareError(f"no readable images in {src.root or src.name}; {len(bad)} files failed to decode, "
                           f"e.g. {bad[:3]}")
    labels = src.labels[good]
    val_pos = (stratified_sample(labels, val_fraction, np.random.default_rng([seed, 0]), keep_one=True)
               if val_fraction > 0 else np.zeros(0, dtype=np.int64))
    train_pos = np.setdiff1d(np.arange(len(good)), val_pos)
    if subset is not None:
        train_pos = train_pos[np.isin(good[train_pos], subset)]
    elif label_fraction is not None and label_fraction < 1.0:
        keep = stratified_sample(labels[train_pos], label_fraction, np.random.default_rng([seed, 1]), keep_one=False)
        train_pos = train_pos[keep]
    # Stored in a seeded random order, so class-sorted folders still give mixed pages (QUASI_RANDOM).
    store_rng = np.random.default_rng([seed, 2])
    train_idx = store_rng.permutation(good[train_pos])
    val_idx = store_rng.permutation(good[val_pos])

    image_field = _image_field(max_resolution, jpeg_quality, compress_probability)
    jobs = [(out, train_idx)] + ([(val_out, val_idx)] if val_out else [])
    temps = {p: p.with_name(f".{p.name}.tmp-{os.getpid()}") for p, _ in jobs}
    temps[manifest_out] = manifest_out.with_name(f".{manifest_out.name}.tmp-{os.getpid()}")
    skipped = {**src.skipped_counts, "unreadable": len(bad)}
    subset_info = None if subset is None else {
        "file": str(Path(label_subset).expanduser().resolve()), "listed": len(subset_names),
        "sha256": hashlib.sha256(Path(label_subset).expanduser().read_bytes()).hexdigest()}
    manifest = {
        "format": "byol-ray prepared data set, version 1",
        "source": src.fingerprint(),
        "split": split,
        "options": {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
                    "compress_probability": compress_probability, "ffcv_image_field": image_field,
                    "label_fraction": label_fraction, "label_subset": subset_info, "val_fraction": val_fraction,
                    "seed": seed},
        "counts": {"listed": len(src), "readable": int(len(good)), "written": int(len(train_idx)),
                   "val": int(len(val_idx)), "skipped": skipped},
        "skipped_examples": {**src.skipped, "unreadable": [f"{p}: {r}" for p, r in bad[:MAX_EXAMPLES]]},
        "class_names": src.class_names,
        "class_counts": {"written": np.bincount(src.labels[train_idx], minlength=len(src.class_names)).tolist(),
                         "val": np.bincount(src.labels[val_idx], minlength=len(src.class_names)).tolist()},
        "files": {"train": out.name, "val": val_out.name if val_out else None},
    }
    try:  # the finally also runs on Ctrl-C (KeyboardInterrupt): no temporary file outlives an interrupt
        for path, indices in jobs:
            _write_beton(temps[path], src, indices, image_field, num_workers, progress, f"writing {path.name}")
        # what a copy of each file must match (staging from an object store verifies it before use)
        manifest["checksums"] = {path.name: file_checksum(temps[path]) for path, _ in jobs}
        manifest["seconds"] = round(time.time() - started, 1)
        temps[manifest_out].write_text(json.dumps(manifest, indent=1) + "\n")
        stale_val = val_path_for(out)
        if overwrite and val_out is None and stale_val.exists():
            stale_val.unlink()  # a held-out split from an earlier run no longer matches this file
        # The main file last: its appearance is what other processes wait for.
        for path in [p for p in temps if p != out] + [out]:
            os.replace(temps[path], path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return PrepareResult(path=out, num_written=len(train_idx), val_path=val_out, num_val=len(val_idx),
                         manifest_path=manifest_out, skipped=skipped, class_names=src.class_names)
