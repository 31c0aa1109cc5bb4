"""The GPU code paths, run on a CPU so that a first GPU run does not fail on plumbing: the step under bf16 (and
fp16) autocast (``train.cpu_autocast``, a test mode), ``train.compile`` with inductor, and SyncBatchNorm + DDP
wrapping in a real (gloo, one-rank) process group."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as torch_dist
from torch import nn

from byol_ray import engine as engine_module
from byol_ray.byol import build_networks, online_ema_parameters, update_target
from byol_ray.checkpoint import load_checkpoint, save_checkpoint
from byol_ray.config import derive, load_config
from byol_ray.engine import BYOLEngine, place_networks
from ports import free_port

CPU = torch.device("cpu")
TINY = ["model.projector_hidden_dim=32", "model.predictor_hidden_dim=32", "model.projector_dim=16",
        "train.batch_size=16", "train.epochs=2", "data.resolution=16", "mlflow.enabled=false", "train.device=cpu"]


def _engine(*overrides: str) -> BYOLEngine:
    cfg = load_config(["demo"], [*TINY, *overrides])
    return BYOLEngine(cfg, derive(cfg, 64, 1), CPU)


def _batches(n: int, batch: int = 16, side: int = 16) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=g),
             torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ----------------------------------------------------------------------------- (a) mixed precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_step_under_cpu_autocast_trains_and_round_trips(precision, tmp_path):
    """train.cpu_autocast=true runs the GPU's autocast path on the CPU: the networks compute in the low
    precision, the loss is finite, the online network learns, the EMA moves the target, and a state_dict
    (the fp16 GradScaler's included) resumes the same next step."""
    assert _engine(f"train.precision={precision}").autocast_dtype is None  # the default: CPU runs fp32
    engine = _engine(f"train.precision={precision}", "train.cpu_autocast=true")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert engine.autocast_dtype is dtype and engine.scaler.is_enabled() == (precision == "fp16")
    seen = []
    hook = engine.online.encoder.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    online0, target0 = _params(engine.online), [p.detach().clone() for p in engine.target.ema_parameters()]
    batches = _batches(4)
    for batch in batches[:3]:
        metrics = engine.train_step(*batch)
        assert torch.isfinite(metrics["loss"]) and 0.0 <= float(metrics["loss"]) <= 8.0
    hook.remove()
    assert seen and set(seen) == {dtype}  # the encoder really ran in the low precision
    assert all(p.dtype is torch.float32 for p in engine.online.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(online0, engine.online.parameters()))
    moved = [not torch.equal(a, b) for a, b in zip(target0, engine.target.ema_parameters())]
    assert any(moved), "the EMA did not move the target"
    assert any(not torch.equal(t, o) for t, o in zip(engine.target.ema_parameters(),
                                                      online_ema_parameters(engine.online)))

    state = load_checkpoint(save_checkpoint(engine.state_dict(), tmp_path / "state.pt"))  # the real file
    fresh = _engine(f"train.precision={precision}", "train.cpu_autocast=true")
    fresh.load_state_dict(state)
    assert fresh.step == 3 and fresh.scaler.state_dict() == engine.scaler.state_dict()
    a, b = engine.train_step(*batches[3]), fresh.train_step(*batches[3])
    assert torch.equal(a["loss"], b["loss"])
    assert all(torch.equal(x, y) for x, y in zip(engine.online.parameters(), fresh.online.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(engine.target.parameters(), fresh.target.parameters()))


# ----------------------------------------------------------------------------- (b) torch.compile


@pytest.mark.slow  # inductor compiles the step's C++ kernels: ~40 s of CPU, the fast tier's largest case
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor compiles CPU kernels with a C++ compiler; none (g++/c++) on PATH")
def test_compiled_step_matches_eager():
    """train.compile=true: inductor-compiled online (the module the step calls) and target forward give the
    eager step's losses and weights closely, and the state_dict keys stay those of the eager modules."""
    eager, compiled = _engine(), _engine("train.compile=true")
    assert compiled.online_ddp is not compiled.online and compiled.target_forward is not compiled.target
    assert list(compiled.state_dict()["online"]) == list(eager.state_dict()["online"])  # no _orig_mod. prefix
    assert list(compiled.state_dict()["target"]) == list(eager.state_dict()["target"])
    for batch in _batches(3):
        a, b = eager.train_step(*batch), compiled.train_step(*batch)
        assert torch.allclose(a["loss"], b["loss"], rtol=1e-4, atol=1e-5), (float(a["loss"]), float(b["loss"]))
    for x, y in zip(eager.online.parameters(), compiled.online.parameters()):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-5)
    for x, y in zip(eager.target.parameters(), compiled.target.parameters()):  # the EMA read the real modules
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- (c) SyncBN and DDP


@pytest.fixture
def gloo_world_of_one():
    """A real torch.distributed process group (gloo) of one rank on loopback; destroyed afterwards."""
    port = free_port()
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def _batch_norms(module: nn.Module) -> list[type]:
    return [type(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_sync_bn_is_converted_before_ddp_wraps_the_online_network(gloo_world_of_one, monkeypatch):
    """place_networks: SyncBatchNorm in both networks, then DDP around the online network alone, so that the
    module DDP wraps holds the SyncBatchNorm layers; the EMA reads the unwrapped online (ddp.module).

    DDP refuses SyncBatchNorm in a CPU module with a guard at construction (``_passing_sync_batchnorm_handle``,
    which checks and does nothing else); the test replaces that guard by a probe that records how many
    SyncBatchNorm layers DDP saw when it wrapped the module. Everything else is the real DDP."""
    seen = []
    monkeypatch.setattr(nn.parallel.DistributedDataParallel, "_passing_sync_batchnorm_handle",
                        lambda self, module: seen.append(sum(isinstance(m, nn.SyncBatchNorm) for m in module.modules())))
    cfg = load_config(["demo"], TINY)
    torch.manual_seed(0)
    online, target = build_networks(cfg.model)
    plain = _batch_norms(online)
    assert nn.BatchNorm2d in plain and nn.BatchNorm1d in plain
    online, target, online_ddp = place_networks(online, target, CPU, sync_bn=True, ddp=True,
                                                memory_format=torch.channels_last)
    assert isinstance(online_ddp, nn.parallel.DistributedDataParallel)
    assert seen == [len(plain)]  # DDP wrapped a module whose BatchNorms were all SyncBatchNorm already
    assert online_ddp.module is online  # the EMA and checkpoints read this one
    inside = _batch_norms(online_ddp.module)
    assert len(inside) == len(plain) and set(inside) == {nn.SyncBatchNorm}  # converted before wrapping
    assert set(_batch_norms(target)) == {nn.SyncBatchNorm} and len(_batch_norms(target)) < len(plain)  # no predictor
    assert not isinstance(target, nn.parallel.DistributedDataParallel)
    ddp_params = {id(p) for p in online_ddp.parameters()}
    assert all(id(p) in ddp_params for p in online_ema_parameters(online))  # DDP syncs what the EMA reads
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    update_target(target, online, 0.0)  # τ = 0: the target becomes the online network
    assert all(torch.equal(t, o) for t, o in zip(target.ema_parameters(), online_ema_parameters(online)))


def test_sync_bn_stays_cuda_only_at_run_time(gloo_world_of_one):
    """The recipe on CPU is unchanged: 'auto' keeps plain BatchNorm on CPU workers, 'on' is refused."""
    engine = _engine("model.sync_bn=auto")
    assert not engine.sync_bn and nn.SyncBatchNorm not in _batch_norms(engine.online)
    assert engine.online_ddp is engine.online  # a group of one is not wrapped
    with pytest.raises(RuntimeError, match="needs CUDA workers"):
        _engine("model.sync_bn=on", "ray.use_gpu=true")  # the config allows it for GPU workers


def test_a_ddp_wrapped_step_matches_the_unwrapped_one(gloo_world_of_one, monkeypatch):
    """The engine's DDP path (wrapping, gradient all-reduce, the EMA through the unwrapped module) in a real
    process group of one rank: the same losses and weights as the unwrapped step."""
    plain = _engine()
    original = engine_module.place_networks
    monkeypatch.setattr(engine_module, "place_networks", lambda *a, **k: original(*a, **{**k, "ddp": True}))
    wrapped = _engine()
    assert isinstance(wrapped.online_ddp, nn.parallel.DistributedDataParallel)
    assert wrapped.online_ddp.module is wrapped.online
    for batch in _batches(3):
        a, b = plain.train_step(*batch), wrapped.train_step(*batch)
        assert torch.allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    for x, y in zip(plain.online.parameters(), wrapped.online.parameters()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)
    for x, y in zip(plain.target.parameters(), wrapped.target.parameters()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)
    assert list(wrapped.state_dict()["online"]) == list(plain.state_dict()["online"])  # no module. prefix
