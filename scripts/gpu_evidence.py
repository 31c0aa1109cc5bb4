"""GPU evidence in one run: the core's CUDA paths, BYOL ResNet-50 throughput, CIFAR-10 accuracy per minute.

Made for a lent GPU machine with torch and torchvision alone (no Ray, MLflow, FFCV or pyarrow): everything
here is the pure core or ``byol-ray train --no-ray`` with tracking off. Prints one JSON record per part and
writes them all to ``--out`` (JSON lines).

Usage:
  python scripts/gpu_evidence.py --cifar /data/cifar10 --out gpu.jsonl      # all three parts
  python scripts/gpu_evidence.py --parts checks --out gpu.jsonl             # one part
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import harness  # noqa: E402
from byol_ray.augment import VIEW1, VIEW2, AugmentParams, apply_params, sample_params  # noqa: E402
from byol_ray.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from byol_ray.config import derive, load_config  # noqa: E402
from byol_ray.data.memory import MemoryTwoViewBatches  # noqa: E402
from byol_ray.engine import BYOLEngine  # noqa: E402

DEVICE = "cuda"  # --device cpu: a dry run of the script itself on a machine without a GPU
TINY = ["model.encoder=resnet18", "model.cifar_stem=true", "data.resolution=32", "train.batch_size=64",
        "train.epochs=10", "mlflow.enabled=false"]


def _engine(*extra: str) -> tuple[BYOLEngine, MemoryTwoViewBatches]:
    cfg = load_config(["cifar10_resnet18"], [*TINY, f"train.device={DEVICE}", *extra])
    device = torch.device(DEVICE)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(1)).to(device)
    batches = MemoryTwoViewBatches(images, labels, batch_size=cfg.train.batch_size, resolution=32,
                                   scale=cfg.data.crop_scale, ratio=cfg.data.crop_ratio, flip_prob=cfg.data.flip_prob,
                                   law=cfg.data.crop_law, seed=0, shuffle=True, rank=0, world_size=1, drop_last=True)
    return BYOLEngine(cfg, derive(cfg, 256, 1), device), batches


def check_step(precision: str, channels_last: bool) -> dict:
    """A few real steps: finite loss, online weights moved by LARS, target moved by exactly the EMA."""
    engine, batches = _engine(f"train.precision={precision}", f"train.channels_last={str(channels_last).lower()}")
    batches.set_epoch(0)
    stream = iter(batches)
    engine.train_step(*next(stream))  # step 0: the warm-up's learning rate is 0 there
    v1, v2, y = next(stream)
    assert v1.device.type == DEVICE and v1.dtype == torch.uint8, (v1.device, v1.dtype)
    before_online = [p.detach().clone() for p in engine.online.parameters()]
    target_before = [p.detach().clone() for p in engine.target.ema_parameters()]
    metrics = engine.train_step(v1, v2, y)
    loss = float(metrics["loss"])
    assert loss == loss and abs(loss) < 1e3, loss
    moved = sum(int(not torch.equal(a, b)) for a, b in zip(before_online, engine.online.parameters()))
    assert moved > 0, "no online parameter changed"
    # the EMA used the online weights after this step's update: target' = tau*target + (1-tau)*online'
    tau = float(metrics["tau"]) if "tau" in metrics else None
    from byol_ray.byol import online_ema_parameters

    worst = 0.0
    if tau is not None:
        for t0, t1, o1 in zip(target_before, engine.target.ema_parameters(), online_ema_parameters(engine.online)):
            expect = tau * t0.float() + (1 - tau) * o1.detach().float()
            worst = max(worst, float((t1.float() - expect).abs().max()))
        assert worst < 1e-5, f"target differs from the EMA by {worst}"
    for _ in range(2):
        engine.train_step(*next(stream))
    kept = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in engine.online.parameters())
    layout = "channels_last" if kept else "contiguous"
    return {"loss": round(loss, 4), "online_params_moved": moved, "tau": tau, "ema_max_err": worst,
            "weights_layout": layout}


def check_checkpoint(tmp: Path) -> dict:
    """Save on CUDA, load into a fresh engine, the next step matches the uninterrupted one bit for bit."""
    engine, batches = _engine("train.precision=bf16")
    batches.set_epoch(0)
    stream = list(iter(batches))
    engine.train_step(*stream[0])
    path = save_checkpoint(engine.state_dict(), tmp / "state.pt")
    state = load_checkpoint(path, map_location=DEVICE)
    fresh, _ = _engine("train.precision=bf16")
    fresh.load_state_dict(state)
    a = engine.train_step(*stream[1])
    b = fresh.train_step(*stream[1])
    same = all(torch.equal(x, y) for x, y in zip(engine.online.parameters(), fresh.online.parameters()))
    return {"loss_after_restore": float(b["loss"]), "loss_uninterrupted": float(a["loss"]), "weights_equal": same}


def check_augment() -> dict:
    """The colour augmentation on CUDA against the CPU path (same parameters, drawn once on the CPU)."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = {}
    for name, view in (("view1", VIEW1), ("view2", VIEW2)):
        params = sample_params(64, view, torch.Generator().manual_seed(3), "cpu")
        on_gpu = AugmentParams(**{k: getattr(params, k).to(DEVICE) for k in params.__dataclass_fields__})
        cpu = apply_params(images, params, view)
        gpu = apply_params(images.to(DEVICE), on_gpu, view).cpu()
        out[f"{name}_max_abs_diff"] = float((cpu - gpu).abs().max())
        assert out[f"{name}_max_abs_diff"] < 1e-3, out
    return out


def check_sync_bn() -> dict:
    """SyncBatchNorm conversion and DDP wrapping order in a real 2-process group on this GPU (gloo carries the
    collectives: NCCL refuses two ranks on one device)."""
    script = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
from byol_ray.config import derive, load_config
from byol_ray.engine import BYOLEngine
cfg = load_config(["cifar10_resnet18"], ["model.encoder=resnet18", "data.resolution=32", "train.batch_size=64",
                  "train.epochs=10", "mlflow.enabled=false", "train.device=cuda", "model.sync_bn=on"])
engine = BYOLEngine(cfg, derive(cfg, 256, 2), torch.device("cuda"))
n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in engine.online.modules())
wrapped = type(engine.online_ddp).__name__
g = torch.Generator().manual_seed(rank)
v = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g).cuda()
m = engine.train_step(v, v.flip(3), torch.zeros(32, dtype=torch.long, device="cuda"))
w = next(engine.online.parameters()).detach().clone()
both = [torch.empty_like(w) for _ in range(2)]
dist.all_gather(both, w)
print("RESULT", n_sync, wrapped, float(m["loss"]), bool(torch.equal(both[0], both[1])), flush=True)
dist.destroy_process_group()
"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), port, str(ROOT)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    lines = [next((ln for ln in o.splitlines() if ln.startswith("RESULT")), None) for o, _ in outs]
    if not all(lines):
        raise RuntimeError("; ".join(e[-1500:] for _, e in outs))
    n_sync, wrapped, loss, equal = lines[0].split()[1:]
    assert int(n_sync) > 0 and wrapped == "DistributedDataParallel" and equal == "True", lines
    return {"syncbn_layers": int(n_sync), "online_wrapper": wrapped, "loss_rank0": float(loss),
            "ranks_weights_equal": equal == "True"}


def checks(tmp: Path) -> dict:
    results = {}
    for name, fn in (("step_bf16_channels_last", lambda: check_step("bf16", True)),
                     ("step_fp32", lambda: check_step("fp32", False)),
                     ("checkpoint_round_trip", lambda: check_checkpoint(tmp)),
                     ("augment_cuda_vs_cpu", check_augment),
                     *((("sync_bn_ddp_two_processes", check_sync_bn),) if DEVICE == "cuda" else ())):
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as exc:  # noqa: BLE001 - every check reports, the run goes on
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                             "trace": traceback.format_exc()[-2000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(results[name])[:600], flush=True)
    return {"part": "cuda_checks", **results}


def supervised_baseline(batch: int, steps: int = 30, warmup: int = 10) -> dict:
    """A plain supervised ResNet-50 step (bf16 autocast, channels_last, SGD) on the same batch of 224-px images."""
    import torchvision

    device = torch.device("cuda")
    model = torchvision.models.resnet50().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    return {"supervised_images_per_s": round(batch / step_s, 1), "supervised_step_ms": round(1e3 * step_s, 2)}


def byol_throughput(*argv: str) -> dict:
    import bench_gpu

    t0 = time.perf_counter()
    try:
        r = bench_gpu.main(list(argv))
    except Exception as exc:  # noqa: BLE001
        r = {"error": f"{type(exc).__name__}: {exc}"[:2000], "command": " ".join(argv)}
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    torch.cuda.empty_cache()
    return {"part": "byol_resnet50", **r}


def largest_batch() -> dict:
    import bench_gpu

    fits = {}
    for batch in (512, 1024, 2048):
        try:
            r = bench_gpu.main(["--batch", str(batch), "--steps", "5", "--warmup", "3",
                                "--dataset-size", str(max(2048, batch * 2))])
            fits[batch] = {"fits": True, "images_per_s": r["images_per_s"], "peak_memory_gb": r["peak_memory_gb"]}
        except torch.OutOfMemoryError:
            fits[batch] = {"fits": False}
            break
        finally:
            torch.cuda.empty_cache()
    return {"part": "largest_batch", "per_gpu": fits}


def cifar(root: Path, epochs: int, every: int, runs: Path, budget_s: int) -> dict:
    """``byol-ray train --no-ray`` of the cifar10_resnet18 preset on the memory loader, held-out kNN on test."""
    cmd = [sys.executable, "-m", "byol_ray.cli", "train", "--no-ray", "--config", "cifar10_resnet18",
           f"data.train={root / 'train'}", f"data.val={root / 'test'}", "data.loader=memory",
           "mlflow.enabled=false", f"train.epochs={epochs}", f"eval.every_epochs={every}",
           f"train.checkpoint_every_epochs={epochs}", "run_name=cifar", f"output_dir={runs}",
           f"data.cache_dir={runs / 'cache'}"]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        rc, err = out.returncode, out.stderr
    except subprocess.TimeoutExpired as exc:  # what it finished by then is in its run folder
        rc, err = f"stopped after {budget_s} s", (exc.stderr or b"").decode(errors="replace")
    wall = time.perf_counter() - t0
    history = [json.loads(ln) for ln in (runs / "cifar" / "metrics.jsonl").read_text().splitlines()] \
        if (runs / "cifar" / "metrics.jsonl").exists() else []
    val = [json.loads(ln) for ln in (runs / "cifar" / "validation.jsonl").read_text().splitlines()] \
        if (runs / "cifar" / "validation.jsonl").exists() else []
    return {"part": "cifar10_resnet18", "command": " ".join(cmd[1:]), "rc": rc, "wall_s": round(wall, 1),
            "epochs_done": len(history), "history_tail": history[-2:], "validation": val,
            "stderr_tail": err[-3000:]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="checks,throughput,cifar")
    p.add_argument("--cifar", type=Path, default=None, help="CIFAR-10 as ImageFolder: <root>/train, <root>/test")
    p.add_argument("--cifar-epochs", type=int, default=30)
    p.add_argument("--cifar-every", type=int, default=10)
    p.add_argument("--cifar-budget-s", type=int, default=240)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_evidence"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the checks")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    global DEVICE
    DEVICE = args.device
    bench = harness.Bench("gpu_evidence.py", argv, args, python="python3")  # the load, the command, the machine
    header = {"part": "machine", "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
              "command": bench.command, "machine": harness.machine(), "git": harness.git_commit(),
              "load_average_at_start": bench.load_before}

    def emit(record: dict) -> None:
        print(json.dumps(record)[:3000], flush=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    emit(header)
    torch.backends.cudnn.benchmark = True
    if "checks" in parts:
        emit(checks(args.work))
    if "throughput" in parts:
        emit(byol_throughput("--steps", "30"))
        emit({"part": "supervised_resnet50_baseline", "batch": 256, **supervised_baseline(256)})
    if "cifar" in parts and args.cifar:
        emit(cifar(args.cifar, args.cifar_epochs, args.cifar_every, args.work / "runs", args.cifar_budget_s))
    if "throughput" in parts:
        emit(byol_throughput("--compile", "--steps", "30", "--warmup", "10"))
        emit(largest_batch())
    emit({"part": "load", **bench.load()})


if __name__ == "__main__":
    main()
