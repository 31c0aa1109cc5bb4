"""GPU check of `byol-ray embed` / `serve`'s encoding step: bf16 autocast (their CUDA default) against fp32.

Made for a lent GPU machine with torch alone (Ray is not installable there): it runs the exact per-batch
code of ``embed``'s encoder actors and ``serve``'s replicas (``preprocess.eval_crop`` per image, then
``to_model_input`` and the encoder under ``torch.autocast(bfloat16)``) on real JPEGs, and reports how far bf16
embeddings are from fp32 ones (cosine similarity, relative error, nearest-neighbour agreement) and the
encoding throughput of each in interleaved paired rounds.

    python scripts/gpu_embed_check.py --images DIR_OF_JPEGS --encoder resnet50 --out gpu_embed.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from byol_ray.data.sources import read_image  # noqa: E402
from byol_ray.encoders import build_encoder  # noqa: E402
from byol_ray.preprocess import eval_crop, to_model_input  # noqa: E402


def encode(encoder, images: torch.Tensor, bf16: bool, batch: int) -> torch.Tensor:
    out = []
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(images), batch):
            out.append(encoder(to_model_input(images[start:start + batch])).float())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=8, help="the image set repeated this often for timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_embed.json", help="the JSON record (also printed)")
    args = parser.parse_args(argv)
    bench = harness.Bench("gpu_embed_check.py", argv, args, python="python")
    files = sorted(p for p in Path(args.images).rglob("*.jpg"))
    crops = torch.stack([eval_crop(read_image(p), args.resolution) for p in files]).to(args.device)
    torch.manual_seed(0)
    encoder = build_encoder(args.encoder, cifar_stem=False).to(args.device).eval()
    fp32 = encode(encoder, crops, False, args.batch)
    bf16 = encode(encoder, crops, True, args.batch)
    cos = F.cosine_similarity(fp32, bf16, dim=1)
    rel = (bf16 - fp32).norm(dim=1) / fp32.norm(dim=1)
    nn_fp32 = (F.normalize(fp32) @ F.normalize(fp32).T).fill_diagonal_(-2).argmax(1)
    nn_bf16 = (F.normalize(bf16) @ F.normalize(bf16).T).fill_diagonal_(-2).argmax(1)
    record = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "encoder": args.encoder, "resolution": args.resolution,
              "images": len(files), "feature_dim": fp32.shape[1],
              "cosine_min": float(cos.min()), "cosine_median": float(cos.median()),
              "relative_error_median": float(rel.median()), "relative_error_max": float(rel.max()),
              "nearest_neighbour_agreement": float((nn_fp32 == nn_bf16).float().mean())}
    timed = crops.repeat(args.repeat, 1, 1, 1)
    for bf in (False, True):  # warm-up (cuDNN autotuning)
        encode(encoder, timed[: 2 * args.batch], bf, args.batch)

    def rate(bf: bool):
        def run(_round):
            if args.device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            encode(encoder, timed, bf, args.batch)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return len(timed) / (time.perf_counter() - began)
        return run

    done = harness.interleaved({"fp32": rate(False), "bf16": rate(True)}, args.rounds)  # fp32, bf16, fp32, ...
    record.update(fp32_img_s=done.values("fp32"), bf16_img_s=done.values("bf16"),
                  bf16_over_fp32_median=done.paired("bf16", "fp32", digits=4)["median_ratio"],
                  timed_images=len(timed), batch=args.batch)
    bench.finish(record)
    print(json.dumps(record, indent=1))
    Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
