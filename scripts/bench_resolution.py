"""Which long side to store ImageNet at: crop-law statistics per stored side, and the FFCV loader's cost per side.

Two parts:

1. Statistics, no timing (they do not depend on machine load): for an image of ``--example`` size
   (default 500x375, a common ImageNet shape) stored at each long side (FFCV's ``max_resolution``
   rule: downscale so the long side fits, never upscale) and at full resolution, draw many crops with
   the crop law of ``byol_ray.data.order`` (``crop_boxes``, the batched form of ``crop_box``) and report
   the mean crop side in stored pixels (sqrt(h*w)), the share of 224-px training crops that are
   upsampled (crop side < 224; also: any axis < 224, both axes < 224), and whether the evaluation
   centre crop (224/256 of the shorter side) is upsampled. The same over the synthetic images' shapes.

2. Throughput: an ImageNet-like ImageFolder is built from real CIFAR-10 JPEGs upscaled (PIL bicubic) to
   about 400x350 pixels -- the average size of a real ImageNet image, which is the reason for that
   size -- with a mix of aspect ratios (4:3, 3:4, 1:1, 16:9), saved as JPEG quality 90. For each stored
   side it is prepared with ``byol_ray.data.prepare.prepare(max_resolution=side, jpeg_quality=90)`` and
   the real two-view training loader (``build_train_loader(backend="ffcv", resolution=224,
   crop_law="reference")``) is timed over a fixed number of batches, in interleaved rounds
   (256, 384, 512, 256, ...). Reported per side: median pairs/s and median pairs per CPU-second
   (process CPU time of all threads, ``resource.getrusage``), the load average, and the stored bytes per
   image. Upscaled CIFAR is smoother than a photograph, so its JPEGs are smaller and decode faster
   than real ImageNet files; the ratios between sides are the figure to use, not the absolute rates.

    .venv/bin/python scripts/bench_resolution.py --stats-only                   # part 1 only, seconds
    .venv/bin/python scripts/bench_resolution.py --images 3000 --rounds 5 --batches 20 [--write]

Prints a JSON summary; ``--write`` replaces its section of docs/benchmarks.md (scripts/harness.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from byol_ray.data.loaders import EVAL_CROP_RATIO  # noqa: E402
from byol_ray.data.order import CROP_DRAWS, CROP_LAWS, CropLaw, crop_box, crop_boxes  # noqa: E402

CIFAR_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
SIDES = (256, 384, 512)
RESOLUTION = 224  # the training and evaluation input side of the ImageNet presets
EXAMPLE = (500, 375)  # width, height of the example image
MEAN_SIZE = (400, 350)  # real ImageNet images average about 400x350 pixels: the synthetic images' size
ASPECTS = {"4:3": (4 / 3, 0.5), "3:4": (3 / 4, 0.2), "1:1": (1.0, 0.15), "16:9": (16 / 9, 0.15)}  # ratio, share
STAMP = "imagenet_like.json"
# The loaders measured live as long as this module: once another FFCV Loader has been built, collecting an
# earlier one's compiled decoder raises KeyError in numba's dispatcher finalizer ("Exception ignored in:
# <finalize object ...>", harmless noise; FFCV mutates the numba types those dispatchers are keyed by).
_LOADERS: list = []
MIX_DRAWS = 50_000  # crops per pooled row (scalar law: ~0.5 s per row)


# ---------------------------------------------------------------------------------------- statistics

def stored_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) FFCV stores for ``max_resolution=max_side`` (ffcv.fields.rgb_image.resizer)."""
    if max_side is None:
        return width, height
    ratio = max_side / max(width, height)
    if ratio >= 1:
        return width, height
    return int(ratio * width), int(ratio * height)


def crop_stats(width: int, height: int, law: CropLaw, draws: int, seed: int = 0,
               resolution: int = RESOLUTION) -> dict:
    """Crop sides of ``draws`` crops of a ``width`` x ``height`` stored image under ``law``.

    Returns:
        mean and median crop side (sqrt(h*w), stored pixels), the shares of crops upsampled to
        ``resolution`` (side < resolution; any axis < resolution; both axes < resolution), the mean
        magnification (resolution / side), and the eval centre crop's side and whether it is upsampled.
    """
    u = torch.rand(draws, CROP_DRAWS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    boxes = crop_boxes(u, height, width, law)
    h, w = boxes[:, 2], boxes[:, 3]
    side = torch.sqrt(h * w)
    eval_side = int(EVAL_CROP_RATIO * min(width, height))  # ffcv get_center_crop: int(ratio * shorter side)
    return {
        "stored": [width, height],
        "mean_crop_side": round(side.mean().item(), 1),
        "median_crop_side": round(side.median().item(), 1),
        "share_upsampled": round((side < resolution).double().mean().item(), 4),
        "share_any_axis_upsampled": round((torch.minimum(h, w) < resolution).double().mean().item(), 4),
        "share_both_axes_upsampled": round((torch.maximum(h, w) < resolution).double().mean().item(), 4),
        "mean_magnification": round((resolution / side).mean().item(), 3),
        "eval_crop_side": eval_side,
        "eval_upsampled": eval_side < resolution,
    }


def mix_stats(shapes: list[tuple[int, int]], max_side: int | None, law: CropLaw, draws: int) -> dict:
    """:func:`crop_stats` pooled over many images (each source shape stored at ``max_side``), about ``draws`` crops.

    Uses the scalar law :func:`byol_ray.data.order.crop_box` (one call per crop: cheap for thousands of shapes).
    """
    shapes = [stored_size(w, h, max_side) for w, h in shapes]
    widths, heights = [w for w, _ in shapes], [h for _, h in shapes]
    per = max(1, draws // len(shapes))
    u = np.random.default_rng([seed_of(max_side), 1]).random((len(shapes), per, CROP_DRAWS))
    args = law.args()
    boxes = np.array([[crop_box(u[i, k], h, w, *args)[2:] for k in range(per)] for i, (w, h) in enumerate(shapes)],
                     dtype=np.float64).reshape(-1, 2)
    bh, bw = boxes[:, 0], boxes[:, 1]
    side = np.sqrt(bh * bw)
    eval_up = [int(EVAL_CROP_RATIO * min(w, h)) < RESOLUTION for w, h in shapes]
    return {
        "images": len(shapes),
        "mean_stored": [round(float(np.mean(widths)), 1), round(float(np.mean(heights)), 1)],
        "mean_crop_side": round(float(side.mean()), 1),
        "share_upsampled": round(float(np.mean(side < RESOLUTION)), 4),
        "share_any_axis_upsampled": round(float(np.mean(np.minimum(bh, bw) < RESOLUTION)), 4),
        "share_both_axes_upsampled": round(float(np.mean(np.maximum(bh, bw) < RESOLUTION)), 4),
        "share_eval_upsampled": round(float(np.mean(eval_up)), 4),
    }


def seed_of(max_side: int | None) -> int:
    return 0 if max_side is None else int(max_side)


def crop_statistics(sides, example=EXAMPLE, laws=CROP_LAWS, draws: int = 200_000,
                    shapes: list[tuple[int, int]] | None = None) -> dict:
    """{law: {side or 'full': crop_stats of the example}}, and the same pooled over ``shapes`` under 'mix'."""
    out: dict = {"example": list(example), "resolution": RESOLUTION, "draws": draws,
                 "crop_side": "sqrt(h*w) of the crop box in stored pixels; upsampled: < resolution"}
    for name in laws:
        law = CropLaw(name)
        out[name] = {str(s): crop_stats(*stored_size(*example, s), law, draws) for s in sides}
        out[name]["full"] = crop_stats(*example, law, draws)
        if shapes:
            mix_draws = min(draws, MIX_DRAWS)
            out[name]["mix"] = {str(s) if s else "full": mix_stats(shapes, s, law, mix_draws) for s in [*sides, None]}
    return out


def recommend(stats: dict, law: str = "reference") -> dict:
    """The smallest side at which most training crops are not upsampled and the eval crop is not."""
    for side, s in stats[law].items():
        if side != "full" and side != "mix" and s["share_upsampled"] < 0.5 and not s["eval_upsampled"]:
            return {"side": int(side), "law": law, "share_not_upsampled": round(1 - s["share_upsampled"], 4),
                    "share_any_axis_upsampled": s["share_any_axis_upsampled"], "eval_crop_side": s["eval_crop_side"]}
    return {"side": None, "law": law}


# ------------------------------------------------------------------------------ ImageNet-like data

def synthetic_shapes(count: int, seed: int = 0, mean_size=MEAN_SIZE, aspects=ASPECTS,
                     area_jitter: float = 1.25) -> list[tuple[int, int]]:
    """(width, height) of ``count`` synthetic images: the area of ``mean_size`` times a log-uniform factor in
    [1/area_jitter, area_jitter], aspect ratios drawn from ``aspects`` by their shares."""
    rng = np.random.default_rng([seed, 7])
    names = list(aspects)
    shares = np.array([aspects[n][1] for n in names], dtype=float)
    picks = rng.choice(len(names), size=count, p=shares / shares.sum())
    areas = mean_size[0] * mean_size[1] * np.exp(rng.uniform(-math.log(area_jitter), math.log(area_jitter), count))
    out = []
    for k, area in zip(picks, areas):
        ratio = aspects[names[k]][0]
        out.append((int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))))
    return out


def cifar_jpegs(cifar: Path, count: int):
    """Yields (class, name, JPEG bytes) of up to ``count`` CIFAR-10 train images, spread evenly over classes.

    ``cifar`` is the archive (train/<class>/*.jpg inside) or an unpacked train folder (<class>/*.jpg).
    """
    per_class = math.ceil(count / 10)
    taken: dict[str, int] = {}
    if cifar.is_file():
        with tarfile.open(cifar) as tar:
            for member in tar:
                parts = member.name.split("/")
                if not (member.isfile() and len(parts) == 3 and parts[0] == "train" and parts[2].endswith(".jpg")):
                    continue
                if taken.get(parts[1], 0) < per_class:
                    taken[parts[1]] = taken.get(parts[1], 0) + 1
                    yield parts[1], Path(parts[2]).stem, tar.extractfile(member).read()
                    if sum(taken.values()) >= count:
                        return
        return
    root = cifar / "train" if (cifar / "train").is_dir() else cifar
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(cls.glob("*.jpg"))[:per_class]:
            yield cls.name, path.stem, path.read_bytes()


def make_imagenet_like(cifar: Path, out: Path, count: int, seed: int = 0) -> dict:
    """An ImageFolder of ``count`` CIFAR-10 images upscaled (bicubic) to :func:`synthetic_shapes`, JPEG q90.

    Reused when ``out`` holds one made with the same parameters (a stamp file records them).
    """
    from io import BytesIO

    from PIL import Image

    params = {"cifar": str(cifar), "count": count, "seed": seed, "mean_size": list(MEAN_SIZE),
              "aspects": {k: list(v) for k, v in ASPECTS.items()}, "jpeg_quality": 90, "resample": "bicubic"}
    stamp = out / STAMP
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved["params"] == params:
            return saved
    if out.exists():
        shutil.rmtree(out)
    shapes = synthetic_shapes(count, seed)
    started, written, nbytes = time.perf_counter(), [], 0
    sources = list(cifar_jpegs(cifar, count))
    if not sources:
        raise SystemExit(f"no CIFAR-10 train JPEGs found in {cifar}")
    for i, (w, h) in enumerate(shapes):
        cls, stem, data = sources[i % len(sources)]  # reused with another shape when count > the sources
        target = out / "train" / cls / f"{stem}_{i}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(BytesIO(data)).convert("RGB").resize((w, h), Image.BICUBIC)
        image.save(target, "JPEG", quality=90)
        nbytes += target.stat().st_size
        written.append([w, h])
    info = {"params": params, "root": str(out / "train"), "images": len(written), "shapes": written,
            "mean_size": [round(float(np.mean([s[0] for s in written])), 1),
                          round(float(np.mean([s[1] for s in written])), 1)],
            "mean_file_bytes": round(nbytes / len(written)), "seconds": round(time.perf_counter() - started, 1)}
    stamp.write_text(json.dumps(info))
    return info


# -------------------------------------------------------------------------------------- throughput

def cpu_seconds() -> float:
    """CPU time of this process so far, every thread (FFCV decodes in threads of this process)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_round(loader, batches: int, batch_size: int, warmup: int = 1) -> dict:
    """One round: a fresh epoch iterator, ``warmup`` untimed batches, then ``batches`` timed ones."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, cpu_start, count = time.perf_counter(), cpu_seconds(), 0
    while count < batches:
        try:
            next(it)
        except StopIteration:
            it.close()
            it = iter(loader)
            continue
        count += 1
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    it.close()  # stops FFCV's producer thread
    pairs = count * batch_size
    return {"pairs_per_s": round(pairs / elapsed, 1), "pairs_per_cpu_s": round(pairs / max(cpu, 1e-9), 1),
            "seconds": round(elapsed, 2), "cpu_s": round(cpu, 2), "load_1min": round(os.getloadavg()[0], 2)}


def stored_figures(path: Path) -> dict:
    """Mean stored size and bytes per image (the samples' allocations; the file adds FFCV's 8 MiB pages)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    image = reader.metadata["f0"]  # the 'image' field (prepare writes it first)
    return {"mean_stored": [round(float(image["width"].mean()), 1), round(float(image["height"].mean()), 1)],
            "bytes_per_image": round(float(reader.alloc_table["size"].sum()) / reader.num_samples),
            "file_bytes": path.stat().st_size}


def measure(data: Path, work: Path, sides, args) -> dict:
    """Prepares one .beton per side, then times the two-view loader on each in interleaved rounds."""
    from byol_ray.data.loaders import build_train_loader
    from byol_ray.data.prepare import prepare

    betons, prep = {}, {}
    for side in sides:
        path = work / f"imagenet-like-{side}.beton"
        start = time.perf_counter()
        prepare(data, path, max_resolution=side, jpeg_quality=90, num_workers=args.workers, overwrite=True,
                progress=False)
        prep[side] = {"prepare_s": round(time.perf_counter() - start, 1), **stored_figures(path)}
        betons[side] = path
    loaders, warmup_s = {}, {}
    for side in sides:  # the first batch compiles the pipeline (numba): excluded from every timing
        start = time.perf_counter()
        loaders[side] = build_train_loader(betons[side], backend="ffcv", batch_size=args.batch_size,
                                           resolution=RESOLUTION, crop_law="reference", num_workers=args.workers,
                                           seed=0)
        it = iter(loaders[side])
        next(it)
        it.close()
        warmup_s[side] = round(time.perf_counter() - start, 1)
    _LOADERS.extend(loaders.values())
    done = harness.interleaved({str(side): (lambda r, side=side: time_round(loaders[side], args.batches,
                                                                            args.batch_size)) for side in sides},
                               args.rounds, describe=lambda row: ", ".join(
                                   f"{s}: {row[str(s)]['pairs_per_s']} pairs/s" for s in sides))  # 256, 384, 512, ...
    out = {}
    base = str(sides[0])
    for side in map(str, sides):
        out[side] = {
            **prep[int(side)], "warmup_s": warmup_s[int(side)],
            "pairs_per_s": round(done.median(side, "pairs_per_s"), 1),
            "pairs_per_cpu_s": round(done.median(side, "pairs_per_cpu_s"), 1),
            "rounds_pairs_per_s": done.values(side, "pairs_per_s"),
            "rounds_pairs_per_cpu_s": done.values(side, "pairs_per_cpu_s"),
            # CPU per pair of this side / of the smallest, paired per round: both saw about the same load
            f"cpu_per_pair_vs_{base}": done.paired(base, side, "pairs_per_cpu_s")["median_ratio"],
        }
    return out


# ------------------------------------------------------------------------------------------ report

def to_markdown(result: dict) -> str:
    """The section's body (after the harness's run line)."""
    stats, rec = result["crop_stats"], result["recommendation"]
    law = rec["law"]
    ex = "x".join(map(str, stats["example"]))
    lines = []
    if "throughput" in result:
        d = result["data"]
        lines.append(
            f"Data: {d['images']} real CIFAR-10 train JPEGs upscaled (PIL bicubic) to about {MEAN_SIZE[0]}x"
            f"{MEAN_SIZE[1]} pixels (the average size of a real ImageNet image; mean here "
            f"{d['mean_size'][0]:.0f}x{d['mean_size'][1]:.0f}), aspect ratios "
            + ", ".join(f"{k} {v[1]:.0%}" for k, v in ASPECTS.items())
            + f", JPEG quality 90; `prepare(max_resolution=SIDE, jpeg_quality=90)`. Loader: `build_train_loader("
            f"backend='ffcv', resolution={RESOLUTION}, crop_law='reference')`, batch {result['batch_size']}, "
            f"{result['workers']} threads, crop + flip only; {result['rounds']} interleaved rounds of "
            f"{result['batches']} batches per side, medians. Upscaled CIFAR compresses better and decodes "
            "faster than photographs: use the ratios between sides, not the absolute rates.\n")
    lines += [
        f"Crop statistics (no timing; {stats['draws']} draws of the `{law}` crop law per row): a {ex} image stored "
        f"at each long side; crop side = sqrt(h*w) in stored pixels; upsampled = crop side < {RESOLUTION}. "
        f"Eval = centre crop {EVAL_CROP_RATIO:.4g} of the shorter side.\n",
        "| stored long side | stored size | mean crop side | training crops upsampled | any axis upsampled "
        f"| eval crop side | eval upsampled | pairs/s | pairs per CPU-s | CPU per pair vs {result['sides'][0]} "
        "| stored bytes/image |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    tp = result.get("throughput", {})
    for side, s in stats[law].items():
        if side == "mix":
            continue
        t = tp.get(side, {})
        cost = t.get(f"cpu_per_pair_vs_{result['sides'][0]}")
        lines.append(
            f"| {side} | {s['stored'][0]}x{s['stored'][1]} | {s['mean_crop_side']} | {s['share_upsampled']:.1%} | "
            f"{s['share_any_axis_upsampled']:.1%} | {s['eval_crop_side']} | {'yes' if s['eval_upsampled'] else 'no'} | "
            f"{t.get('pairs_per_s', '')} | {t.get('pairs_per_cpu_s', '')} | {f'{cost:.2f}x' if cost else ''} | "
            f"{t.get('bytes_per_image', '')} |")
    other = [name for name in CROP_LAWS if name != law and name in stats]
    for name in other:
        rows = [(side, r) for side, r in stats[name].items() if side != "mix"]
        lines.append(f"\nUnder the `{name}` law, the same image: mean crop side "
                     + ", ".join(f"{r['mean_crop_side']} ({side})" for side, r in rows) + "; training crops upsampled "
                     + ", ".join(f"{r['share_upsampled']:.1%} ({side})" for side, r in rows) + ".")
    if "mix" in stats[law]:
        lines += ["", f"Pooled over the {stats[law]['mix']['full']['images']} synthetic images' shapes:", "",
                  "| stored long side | mean stored size | mean crop side | training crops upsampled "
                  "| eval upsampled |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for side, s in stats[law]["mix"].items():
            lines.append(f"| {side} | {s['mean_stored'][0]:.0f}x{s['mean_stored'][1]:.0f} | "
                         f"{s['mean_crop_side']} | {s['share_upsampled']:.1%} | {s['share_eval_upsampled']:.1%} |")
    if rec.get("side"):
        cost = tp.get(str(rec["side"]), {}).get(f"cpu_per_pair_vs_{result['sides'][0]}")
        lines.append(
            f"\nRecommendation: store at a long side of **{rec['side']}**, the smallest measured side at which most "
            f"training crops are not upsampled ({rec['share_not_upsampled']:.1%} are not, under the `{law}` law) and "
            f"the eval centre crop ({rec['eval_crop_side']} px) is not"
            + (f"; its loader costs {cost:.2f}x the CPU time per pair of {result['sides'][0]}." if cost else "."))
    return "\n".join(lines) + "\n"


def section(result: dict) -> dict:
    """The docs section of a run (harness.Bench.write_section's arguments)."""
    rec = result["recommendation"]
    tp = result.get("throughput", {}).get(str(rec.get("side")), {})
    law = result["crop_stats"][rec["law"]]
    shares = ", ".join(f"{law[str(s)]['share_upsampled']:.1%} at {s} px" for s in result["sides"])
    cost = tp.get(f"cpu_per_pair_vs_{result['sides'][0]}")
    return dict(section_id="stored-resolution-imagenet", body=to_markdown(result),
                title="Stored resolution for ImageNet: crop statistics and loader cost per stored side "
                      f"({time.strftime('%Y-%m-%d')})",
                question="At what size to store ImageNet?",
                summary=f"{rec.get('side')} px long side: training crops upsampled {shares} (a 500x375 image, "
                        f"`{rec['law']}` crop law)" + (f"; {cost:.2f}× the loader CPU per pair of {result['sides'][0]}"
                                                       if cost else ""))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", type=Path, default=CIFAR_ARCHIVE,
                        help="CIFAR-10 JPEG archive (train/<class>/*.jpg) or an unpacked train folder")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/byol-bench-resolution"))
    parser.add_argument("--images", type=int, default=3000, help="synthetic ImageNet-like images")
    parser.add_argument("--sides", type=int, nargs="+", default=list(SIDES), help="stored long sides")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per side per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="loader threads and prepare processes (default: this machine's cores)")
    parser.add_argument("--draws", type=int, default=200_000, help="crops drawn per statistics row")
    parser.add_argument("--example", type=int, nargs=2, default=list(EXAMPLE), metavar=("W", "H"))
    parser.add_argument("--stats-only", action="store_true", help="only the crop statistics (no data, no timing)")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    sides = sorted(args.sides)
    bench = harness.Bench("bench_resolution.py", argv, args, timed=not args.stats_only)
    result: dict = {"sides": sides}
    shapes = None
    if not args.stats_only:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        data = make_imagenet_like(args.cifar, args.work_dir / "imagenet-like", args.images)
        shapes = [tuple(s) for s in data["shapes"]]
        result["data"] = {k: v for k, v in data.items() if k != "shapes"}
        threads = torch.get_num_threads()
        torch.set_num_threads(args.workers)
        result.update(workers=args.workers, batch_size=args.batch_size, rounds=args.rounds, batches=args.batches)
        try:
            result["throughput"] = measure(Path(data["root"]), args.work_dir, sides, args)
        finally:
            torch.set_num_threads(threads)
        bench.end()
    result["crop_stats"] = crop_statistics(sides, tuple(args.example), draws=args.draws, shapes=shapes)
    result["recommendation"] = recommend(result["crop_stats"])
    rec = result["recommendation"]
    if rec.get("side") and "throughput" in result:
        t = result["throughput"]
        rec["cpu_s_per_pair_vs_smallest"] = t[str(rec["side"])][f"cpu_per_pair_vs_{sides[0]}"]
        rec["pairs_per_cpu_s"] = t[str(rec["side"])]["pairs_per_cpu_s"]
        rec["pairs_per_cpu_s_smallest"] = t[str(sides[0])]["pairs_per_cpu_s"]
        rec["pairs_per_s_vs_smallest"] = round(t[str(rec["side"])]["pairs_per_s"] / t[str(sides[0])]["pairs_per_s"], 3)
    bench.finish(result)
    print(json.dumps(result, indent=1))
    bench.write_section(**section(result))
    return result


if __name__ == "__main__":
    main()
