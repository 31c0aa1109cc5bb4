"""Benchmark: batched byol_ray.augment vs per-image torchvision/PIL loops of the same recipe, its time per op, and A/B against another revision; prints JSON."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from byol_ray import augment  # noqa: E402
from byol_ray.augment import VIEW1, VIEW2, ViewAugment, augment_view  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def torchvision_view(view: ViewAugment, side: int) -> v2.Compose:
    """The recipe as a per-image torchvision v2 pipeline on uint8 tensors (torchvision semantics:
    multiplicative brightness, luma-blend saturation, reflect-padded blur)."""
    kernel = view.blur_kernel_size(side)
    return v2.Compose(
        [
            v2.RandomApply(
                [v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                p=view.color_jitter_prob,
            ),
            v2.RandomGrayscale(p=view.grayscale_prob),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=view.blur_sigma)], p=view.blur_prob),
            v2.RandomSolarize(threshold=round(255 * view.solarize_threshold), p=view.solarize_prob),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(view.mean, view.std),
        ]
    )


class PilBlur:
    """PIL Gaussian blur with a random radius, as most public BYOL/MoCo PyTorch ports do it."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def pil_view(view: ViewAugment) -> v2.Compose:
    """The recipe as a per-image PIL pipeline (the classic DataLoader-worker approach)."""
    threshold = round(255 * view.solarize_threshold)
    return v2.Compose(
        [
            v2.RandomApply(
                [v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                p=view.color_jitter_prob,
            ),
            v2.RandomGrayscale(p=view.grayscale_prob),
            v2.RandomApply([PilBlur(view.blur_sigma)], p=view.blur_prob),
            v2.RandomApply([lambda im: ImageOps.solarize(im, threshold)], p=view.solarize_prob),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(view.mean, view.std),
        ]
    )


def interleaved(methods: dict, trials: int) -> harness.Rounds:
    """Seconds per call of each method, methods alternating within every trial (harness.interleaved, after one
    warm-up call each), so that background load hits them alike."""
    def timed(fn):
        def arm(_round):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return arm

    return harness.interleaved({name: timed(fn) for name, fn in methods.items()}, trials, warmup=1, log=None)


def random_batch(batch: int, side: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def measure(side: int, batch: int, trials: int, seed: int) -> dict:
    """Images (augmented views) per second of each method, median trial."""
    images = random_batch(batch, side, seed)
    pil_images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    generator = torch.Generator().manual_seed(seed)
    tv = {"view1": torchvision_view(VIEW1, side), "view2": torchvision_view(VIEW2, side)}
    pil = {"view1": pil_view(VIEW1), "view2": pil_view(VIEW2)}

    def batched():
        for view in (VIEW1, VIEW2):
            augment_view(images, view, generator)

    def torchvision_loop():
        for name in ("view1", "view2"):
            torch.stack([tv[name](im) for im in images])

    def pil_loop():
        for name in ("view1", "view2"):
            torch.stack([pil[name](im) for im in pil_images])

    times = interleaved({"batched": batched, "torchvision_per_image": torchvision_loop, "pil_per_image": pil_loop},
                        trials)
    result = {"side": side, "batch": batch, "trials": trials}
    for name in times.names:
        result[f"{name}_images_per_s"] = round(2 * batch / times.median(name), 1)
    for name in ("torchvision_per_image", "pil_per_image"):  # the median of the per-trial ratios (paired)
        paired = times.paired(name, "batched", digits=2)
        result[f"speedup_vs_{name}"] = paired["median_ratio"]
        result[f"speedup_vs_{name}_range"] = paired["ratio_range"]
    return result


def op_times(side: int, batch: int, trials: int, seed: int) -> dict:
    """Median ms of each step of apply_params per view, and of the jitter's ops on the whole batch.

    Each step gets a fresh copy of the same input (made outside the timer), so the figures add up
    to about one apply_params call.
    """
    images = random_batch(batch, side, seed)
    out = {"side": side, "batch": batch, "trials": trials}
    for name, view in (("view1", VIEW1), ("view2", VIEW2)):
        params = augment.sample_params(batch, view, torch.Generator().manual_seed(seed))
        x = augment._to_unit_float(images)
        mean, std = augment._channel_constant(view.mean, x), augment._channel_constant(view.std, x)
        kernel = view.blur_kernel_size(side)
        solarized = functools.partial(augment._solarized, threshold=view.solarize_threshold)
        use_all = torch.ones(batch, dtype=torch.bool)
        steps = {
            "sample_params": lambda _: augment.sample_params(batch, view, torch.Generator().manual_seed(seed)),
            "uint8_to_float": lambda _: augment._to_unit_float(images),
            "color_jitter": lambda y: augment._color_jitter(y, params),
            "grayscale": lambda y: augment._apply_selected(y, params.grayscale, augment._gray),
            "blur": lambda y: augment._gaussian_blur(y, params.blur_sigma, params.blur_applied, kernel),
            "solarize": lambda y: augment._apply_selected(y, params.solarize, solarized),
            "clip_normalize": lambda y: y.clamp_(0.0, 1.0).sub_(mean).div_(std),
            # The jitter's ops, each on the whole batch (color_jitter runs them on the samples that use them):
            "op_affine_all": lambda y: augment._affine_jitter(y, params.brightness, params.contrast, use_all,
                                                              ~use_all),
            "op_hsv_round_trip_all": lambda y: augment._hsv_jitter(y, params.saturation, params.hue),
            "op_saturation_alone_all": lambda y: augment._saturation_jitter(y, params.saturation),
        }
        def timed(fn):
            def arm(_round):
                y = x.clone()
                start = time.perf_counter()
                fn(y)
                return time.perf_counter() - start
            return arm

        samples = harness.interleaved({step: timed(fn) for step, fn in steps.items()}, trials, warmup=1, log=None)
        ms = {step: round(1e3 * samples.median(step), 3) for step in steps}
        pipeline = sum(v for k, v in ms.items() if not k.startswith("op_"))
        out[name] = {"ms": ms, "pipeline_ms": round(pipeline, 3),
                     "share": {k: round(v / pipeline, 3) for k, v in ms.items() if not k.startswith("op_")}}
    return out


def profile(side: int, batch: int, rows: int, seed: int) -> str:
    """torch.profiler's table of the aten ops of ten two-view calls, by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    images = random_batch(batch, side, seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        augment_view(images, VIEW1, generator), augment_view(images, VIEW2, generator)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            augment_view(images, VIEW1, generator), augment_view(images, VIEW2, generator)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def module_at(revision: str):
    """byol_ray/augment.py as it was at a git revision, imported as a separate module."""
    source = subprocess.run(["git", "show", f"{revision}:byol_ray/augment.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-augment-")) / "augment_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("augment_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def against(revision: str, side: int, batch: int, trials: int, seed: int) -> dict:
    """Paired A/B of the two views' augmentation: `revision`'s augment.py (A) vs the working tree's (B),
    alternating call by call in this process; the median of the per-trial ratios A/B."""
    old = module_at(revision)
    images = random_batch(batch, side, seed)

    def two_views(module):
        generator = torch.Generator().manual_seed(seed)
        return lambda: (module.augment_view(images, module.VIEW1, generator),
                        module.augment_view(images, module.VIEW2, generator))

    times = interleaved({"revision": two_views(old), "working_tree": two_views(augment)}, trials)
    paired = times.paired("revision", "working_tree", digits=2)
    return {"revision": revision, "side": side, "batch": batch, "trials": trials,
            "revision_ms": round(1e3 * times.median("revision"), 2),
            "working_tree_ms": round(1e3 * times.median("working_tree"), 2),
            "median_speedup": paired["median_ratio"], "speedup_range": paired["ratio_range"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    # One thread by default: per-core throughput, as a per-image loop scales by adding workers.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", nargs="+", default=["32:256", "224:32"], metavar="SIDE:BATCH",
                        help="image side and batch of each comparison with the per-image pipelines")
    parser.add_argument("--no-compare", action="store_true", help="skip the per-image pipelines")
    parser.add_argument("--ops", action="store_true", help="median ms of each step and op at the first size")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="print torch.profiler's top ROWS aten ops (stderr) at the first size")
    parser.add_argument("--against", metavar="REV",
                        help="paired A/B at the first size: augment.py at git revision REV vs the working tree")
    harness.add_arguments(parser, write=False)
    args = parser.parse_args(argv)
    bench = harness.Bench("bench_augment.py", argv, args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = [tuple(int(v) for v in size.split(":")) for size in args.sizes]
    side, batch = sizes[0]
    report = {
        "unit": "augmented views per second (each batch is augmented as view1 and as view2)",
        "device": "cpu",
        "torch_threads": args.threads,
    }
    if not args.no_compare:
        report["results"] = [measure(s, b, args.trials, args.seed) for s, b in sizes]
    if args.ops:
        report["ops"] = op_times(side, batch, max(args.trials, 5), args.seed)
    if args.against:
        report["against"] = against(args.against, side, batch, max(args.trials, 5), args.seed)
    if args.profile:
        print(profile(side, batch, args.profile, args.seed), file=sys.stderr)
    bench.finish(report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
