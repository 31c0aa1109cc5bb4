"""Benchmark: two views per image, torchvision's per-image DataLoader vs the FFCV loader + batched augmentation, in paired interleaved rounds; prints JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import quiet_machine  # noqa: E402,F401 - the tests check the rule through this script

from byol_ray import augment as augment_module  # noqa: E402
from byol_ray.augment import ViewAugment, augment_view  # noqa: E402
from byol_ray.config import AugmentConfig, TrainConfig  # noqa: E402
from byol_ray.data.check import validate_beton  # noqa: E402
from byol_ray.data.loaders import TwoViewEpochLoader, build_train_loader  # noqa: E402
from byol_ray.data.prepare import prepare  # noqa: E402
from byol_ray.data.sources import ImageFolderSource, Source  # noqa: E402


def cpu_seconds() -> float | None:
    """CPU time used so far by this process (all threads) and its live children (DataLoader workers)."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


@contextlib.contextmanager
def stdout_to_stderr():
    """Sends file descriptor 1 to stderr meanwhile: stdout is for the JSON, and numba prints a warning on
    it (from C) each time a DataLoader worker is forked after FFCV started its threads."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def endless(loader):
    """Batches across epochs; closing this generator closes the epoch's iterator: FFCV's producer thread
    stops, a DataLoader's worker processes are joined."""
    while True:
        batches = iter(loader)
        try:
            yield from batches
        finally:
            # A DataLoader iterator has no close(); dropping it may wait for the garbage collector.
            close = getattr(batches, "close", None) or getattr(batches, "_shutdown_workers", None)
            if close is not None:
                close()


def join_ffcv_threads(timeout_s: float = 60.0) -> None:
    """Waits for FFCV's producer threads: EpochIterator.close() asks its thread to stop (it polls every
    0.5 s) but does not wait. A thread still decoding would take CPU from the next round, and one still
    inside numba's TBB pool when the process exits aborts it ("terminate called without an active
    exception")."""
    for thread in threading.enumerate():
        if type(thread).__name__ == "EpochIterator" and thread is not threading.current_thread():
            thread.join(timeout_s)


def time_round(loader, consume, batch_size: int, batches: int, warmup_batches: int) -> dict:
    """Times `consume` over `batches` batches of a fresh iterator, after `warmup_batches` untimed ones.

    The iterator is closed and its threads or worker processes joined before returning, so nothing of
    this pipeline runs during the other pipeline's round.
    """
    started = time.perf_counter()
    stream = endless(loader)
    try:
        for _ in range(warmup_batches):
            consume(next(stream))
        warmup_s = time.perf_counter() - started
        cpu_start, start = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            consume(next(stream))
        elapsed, cpu_end = time.perf_counter() - start, cpu_seconds()
    finally:
        stream.close()
        join_ffcv_threads()
    pairs = batches * batch_size
    out = {"pairs_per_s": round(pairs / elapsed, 1), "seconds": round(elapsed, 2), "warmup_s": round(warmup_s, 2)}
    if cpu_start is not None and cpu_end - cpu_start >= 0.1:  # psutil counts in 10-ms ticks
        out["pairs_per_cpu_s"] = round(pairs / (cpu_end - cpu_start), 1)
    return out


def paired_rounds(pipelines: dict, rounds: int, batch_size: int, batches: int, warmup_batches: int) -> dict:
    """Rounds of A, B, A, B, ... (harness.interleaved): each round times the same number of pairs for each pipeline.

    Args:
        pipelines: {"name": (loader, consume)}, in round order; the first is the baseline A, the second B.

    Returns:
        Per-round figures, the paired ratios B/A of pairs/s (one per round) and their median.
    """
    (name_a, name_b) = list(pipelines)[:2]
    arms = {name: (lambda r, lc=lc: time_round(*lc, batch_size, batches, warmup_batches))
            for name, lc in pipelines.items()}
    done = harness.interleaved(arms, rounds, describe=lambda row: ", ".join(
        f"{n} {row[n]['pairs_per_s']} pairs/s" for n in pipelines) + f", ratio "
        f"{row[name_b]['pairs_per_s'] / row[name_a]['pairs_per_s']:.3f}")
    paired = done.paired(name_b, name_a, "pairs_per_s")
    per_round = [{**row, "ratio": ratio} for row, ratio in zip(done.rows, paired["ratios"])]
    out = {"baseline": name_a, "candidate": name_b, "pairs_per_round": batches * batch_size, "rounds": per_round,
           "ratios": paired["ratios"], "median_ratio": round(paired["median_ratio"], 2),
           "ratio_range": paired["ratio_range"]}
    for name in pipelines:
        out[f"{name}_median_pairs_per_s"] = round(done.median(name, "pairs_per_s"), 1)
    if all("pairs_per_cpu_s" in r[name] for r in done.rows for name in pipelines):
        out["median_ratio_per_cpu_s"] = round(done.paired(name_b, name_a, "pairs_per_cpu_s")["median_ratio"], 2)
    return out


# ------------------------------------------------------------------------------------------------ pipelines


def torchvision_view(view: ViewAugment, resolution: int):
    """The BYOL recipe as the classic per-image PIL pipeline of public PyTorch ports
    (torchvision semantics: multiplicative brightness)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(resolution, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                      p=view.color_jitter_prob),
        T.RandomGrayscale(p=view.grayscale_prob),
        T.RandomApply([T.GaussianBlur(view.blur_kernel_size(resolution), sigma=view.blur_sigma)], p=view.blur_prob),
        T.RandomSolarize(threshold=round(255 * view.solarize_threshold), p=view.solarize_prob),
        T.ToTensor(),
        T.Normalize(view.mean, view.std),
    ])


class TwoViews:
    def __init__(self, view1, view2) -> None:
        self.view1, self.view2 = view1, view2

    def __call__(self, image):
        return self.view1(image), self.view2(image)


def torchvision_loader(train_dir: str, *, batch_size: int, workers: int, augment: AugmentConfig):
    """(A) torchvision's per-image two-view pipeline: ImageFolder + PIL transforms in DataLoader worker
    processes. Workers start with each round's iterator and are joined at its end."""
    from torchvision.datasets import ImageFolder

    views = TwoViews(torchvision_view(augment.view1, 32), torchvision_view(augment.view2, 32))
    return torch.utils.data.DataLoader(ImageFolder(train_dir, transform=views), batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True)


def training_consumer(augment: AugmentConfig, memory_format: torch.memory_format, seed: int = 0):
    """(B)'s per-batch work, as byol_ray.engine's train_step does it: augment each view on the batch's
    device with one seeded generator, then lay it out in the model's memory format."""
    generator = torch.Generator().manual_seed(seed)

    def consume(batch):
        view1_u8, view2_u8, _ = batch
        augment_view(view1_u8, augment.view1, generator).contiguous(memory_format=memory_format)
        augment_view(view2_u8, augment.view2, generator).contiguous(memory_format=memory_format)

    return consume


class Upscaled(Source):
    """A seeded subset of an image folder, upscaled (bicubic) to an ImageNet-like size."""

    name = "upscaled"

    def __init__(self, base: ImageFolderSource, count: int, side: int) -> None:
        self.picked = np.random.default_rng(0).permutation(len(base))[:count]
        super().__init__(base.labels[self.picked], base.class_names)
        self.base, self.side = base, side

    def load(self, index: int) -> np.ndarray:
        from PIL import Image

        image = Image.fromarray(self.base.load(int(self.picked[index])))
        return np.asarray(image.resize((self.side, self.side), Image.BICUBIC))

    def fingerprint(self) -> dict:
        return {**self.base.fingerprint(), "kind": self.name, "num_samples": len(self), "side": self.side}


def prepared(source, path: Path, workers: int, **options) -> tuple[Path, float]:
    """The .beton at `path`, written unless a valid one is there; returns (path, seconds spent)."""
    start = time.perf_counter()
    try:
        validate_beton(path)
    except (FileNotFoundError, ValueError):
        prepare(source, path, num_workers=workers, overwrite=True, progress=False, **options)
    return path, round(time.perf_counter() - start, 1)


def _two_pipeline_loader(path, *, batch_size: int, resolution: int, num_workers: int, device: torch.device,
                         seed: int = 0) -> TwoViewEpochLoader:
    """The FFCV two-view loader as it was before byol_ray.data.two_view (baseline for this benchmark only).

    Two pipelines on the one stored field, each `RandomResizedCropRGBImageDecoder` + `RandomHorizontalFlip`:
    every JPEG is decoded twice, and crops and flips come from numba's unseeded generator.
    """
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip

    from byol_ray.data.check import NO_FFCV_HINT, require_ffcv

    require_ffcv(NO_FFCV_HINT)
    from byol_ray.data.two_view import FFCVBatches, ffcv_image_ops, ffcv_label_ops, ffcv_loader

    class TwoPipelineBatches(FFCVBatches):
        def __iter__(self):
            # FFCV emits the file's fields first ('image', 'label'), then the extra view ('image2').
            for batch in super().__iter__():
                yield batch[0], batch[2], batch[1]

    def view_ops():
        decoder = RandomResizedCropRGBImageDecoder((resolution, resolution), (0.08, 1.0), (3 / 4, 4 / 3))
        ops = ffcv_image_ops(decoder, device)
        return ops[:1] + [RandomHorizontalFlip(0.5)] + ops[1:]  # a jitted op straight after the decoder

    pipelines = {"image": view_ops(), "label": ffcv_label_ops(device),
                 "image2": PipelineSpec("image", transforms=view_ops())}
    shard = dict(seed=seed, shuffle=True, rank=0, world_size=1, drop_last=True)
    loader, num_samples = ffcv_loader(path, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                                      pipelines=pipelines, shard=shard)
    return TwoViewEpochLoader(TwoPipelineBatches(loader), backend="ffcv", batch_size=batch_size,
                              num_samples=num_samples)


# ------------------------------------------------------------------------------------------------ report


def _round_table(result: dict, names: dict) -> list[str]:
    a, b = result["baseline"], result["candidate"]
    lines = [f"| round | {names[a]} pairs/s | {names[b]} pairs/s | ratio |", "| ---: | ---: | ---: | ---: |"]
    for r in result["rounds"]:
        lines.append(f"| {r['round']} | {r[a]['pairs_per_s']} | {r[b]['pairs_per_s']} | {r['ratio']:.2f}x |")
    lines.append(f"| **median** | {result[f'{a}_median_pairs_per_s']} | {result[f'{b}_median_pairs_per_s']} | "
                 f"**{result['median_ratio']}x** |")
    return lines


def sections(result: dict) -> list[dict]:
    """The docs sections of a result: one per pair measured (harness.Bench.write_section's arguments)."""
    out = []
    if "cifar" in result:
        c = result["cifar"]
        cpu = (f" Median paired ratio of pairs per CPU-second (this process and its worker processes): "
               f"{c['median_ratio_per_cpu_s']}x." if "median_ratio_per_cpu_s" in c else "")
        body = "\n".join([
            f"CIFAR-10 train ({c['images']} real 32-px JPEGs), batch {c['batch_size']}, {result['workers']} loader "
            f"workers, {result['threads']} torch threads ({result['augment_threads']} inside `byol_ray.augment`), the "
            "paper's two views (blur and solarise included) on CPU. "
            f"Each round times {c['pairs_per_round']} pairs of (A) torchvision's per-image two-view pipeline "
            "(ImageFolder + PIL transforms in DataLoader worker processes), then the same number of (B) the "
            "training path: the FFCV two-view loader (`build_train_loader`) + `byol_ray.augment` as the engine "
            f"applies it ({c['memory_format']} output); each after {c['warmup_batches']} untimed batches, its "
            "workers stopped before the other's turn.\n",
            *_round_table(c, {"torchvision": "(A) torchvision", "ours": "(B) FFCV + batched augment"}),
            f"\n**B is {c['median_ratio']}x A** (median of {len(c['ratios'])} paired ratios, range "
            f"{c['ratio_range'][0]}-{c['ratio_range'][1]}).{cpu}"])
        out.append(dict(section_id="data-two-views", body=body,
                        title=f"Data loading, two views per image, paired rounds ({result['date']})",
                        question="How fast is the data path?",
                        summary=f"FFCV + batched augmentation {c['median_ratio']}× torchvision's per-image two-view "
                                f"loader (median of {len(c['ratios'])} paired rounds, range {c['ratio_range'][0]}–"
                                f"{c['ratio_range'][1]}×)"))
    if "large" in result:
        c = result["large"]
        body = "\n".join([
            f"ImageNet-like: {c['images']} CIFAR-10 images upscaled (bicubic) to {c['stored_side']} px and stored as "
            f"JPEG (quality 90), {c['resolution']}-px crops (OpenCV INTER_AREA resize, FFCV's `resize_crop`), batch "
            f"{c['batch_size']}, {result['workers']} loader threads, crop + flip + transfer only (device "
            f"{c['device']}). Each round times {c['pairs_per_round']} pairs of the two-pipeline loader (each image "
            "decoded twice, unseeded crops), then of `TwoViewDecoder` (decoded once, crops seeded per sample).\n",
            *_round_table(c, {"two_pipeline": "two FFCV pipelines", "decode_once": "`TwoViewDecoder`"}),
            f"\n**decode-once is {c['median_ratio']}x the two-pipeline loader** (median of {len(c['ratios'])} "
            "paired ratios)."])
        out.append(dict(section_id="data-imagenet-like-decode-once", body=body,
                        title=f"Data loading, ImageNet-like, one decode per image, paired rounds ({result['date']})",
                        question="Does decoding each image once help the FFCV loader?",
                        summary=f"`TwoViewDecoder` {c['median_ratio']}× the two-pipeline loader's pairs/s (median of "
                                f"{len(c['ratios'])} paired rounds)"))
    return out


def measure(args, result: dict, augment: AugmentConfig, memory_format: torch.memory_format, work: Path) -> None:
    """Prepares the .beton files (first run only) and runs the paired rounds into `result`."""
    workers, batch = args.workers, args.batch_size
    source = ImageFolderSource(args.train_dir)
    if not args.large_only:
        beton, prepare_s = prepared(source, work / "cifar10-train.beton", workers)
        pipelines = {
            "torchvision": (torchvision_loader(args.train_dir, batch_size=batch, workers=workers, augment=augment),
                            lambda b: None),
            "ours": (build_train_loader(beton, batch_size=batch, resolution=32, num_workers=workers, seed=0),
                     training_consumer(augment, memory_format)),
        }
        result["cifar"] = {**paired_rounds(pipelines, args.rounds, batch, max(1, args.pairs // batch),
                                           args.warmup_batches),
                           "images": len(source), "batch_size": batch, "warmup_batches": args.warmup_batches,
                           "memory_format": "channels_last" if memory_format == torch.channels_last else "contiguous",
                           "prepare_s": prepare_s}
    if args.large or args.large_only:
        large, prepare_s = prepared(Upscaled(source, args.large_images, args.large_side),
                                    work / f"cifar10-upscaled{args.large_side}.beton", workers,
                                    compress_probability=1.0, jpeg_quality=90)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        lb, resolution = args.large_batch_size, args.large_resolution
        pipelines = {
            "two_pipeline": (_two_pipeline_loader(large, batch_size=lb, resolution=resolution, num_workers=workers,
                                                  device=device), lambda b: None),
            "decode_once": (build_train_loader(large, batch_size=lb, resolution=resolution, num_workers=workers,
                                               device=device), lambda b: None),
        }
        result["large"] = {**paired_rounds(pipelines, args.rounds, lb, max(1, args.pairs // lb),
                                           args.warmup_batches),
                           "images": args.large_images, "stored_side": args.large_side, "resolution": resolution,
                           "batch_size": lb, "device": str(device), "prepare_s": prepare_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("train_dir", help="the unpacked CIFAR-10 train split (ImageFolder: train/<class>/*.jpg)")
    parser.add_argument("--work-dir", default="/tmp/byol-bench-data", help="where the .beton files go")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (A then B in each)")
    parser.add_argument("--pairs", type=int, default=16384, help="pairs timed per pipeline per round")
    parser.add_argument("--warmup-batches", type=int, default=2, help="untimed batches before each timed stretch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="DataLoader worker processes (A) and FFCV threads (B)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of this process, as training leaves them (torch's default: the cores)")
    parser.add_argument("--augment-threads", type=int, default=None,
                        help="torch threads inside byol_ray.augment on CPU (default: its CPU_THREADS, as in "
                             "training; 0: the process's --threads)")
    parser.add_argument("--large", action="store_true",
                        help="also the ImageNet-like pair: two-pipeline FFCV loader vs the decode-once loader")
    parser.add_argument("--large-only", action="store_true", help="only the ImageNet-like pair")
    parser.add_argument("--large-images", type=int, default=3000)
    parser.add_argument("--large-side", type=int, default=320)
    parser.add_argument("--large-resolution", type=int, default=224)
    parser.add_argument("--large-batch-size", type=int, default=64)
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    import torchvision  # noqa: F401 - its version goes into the record

    bench = harness.Bench("bench_data.py", argv, args)  # refuses --write on a loaded machine, before any work
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    default_augment_threads = augment_module.CPU_THREADS
    if args.augment_threads is not None:
        augment_module.CPU_THREADS = args.augment_threads or None
    augment, memory_format = AugmentConfig(), (torch.channels_last if TrainConfig().channels_last
                                                else torch.contiguous_format)
    result = {"workers": args.workers, "threads": args.threads,
              "augment_threads": augment_module.CPU_THREADS or args.threads}
    try:
        with stdout_to_stderr():
            measure(args, result, augment, memory_format, work)
    finally:
        augment_module.CPU_THREADS = default_augment_threads
    bench.end()
    result["date"] = bench.date
    bench.finish(result)
    print(json.dumps(result, indent=1))
    for section in sections(result):
        bench.write_section(**section)
    return result


if __name__ == "__main__":
    main()
