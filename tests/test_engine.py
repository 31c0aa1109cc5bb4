"""End-to-end: the real loop on a tiny encoder and real images learns, checkpoints and resumes bit-identically."""
import dataclasses

import pytest
import torch

from byol_ray.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from byol_ray.config import derive, load_config
from byol_ray.engine import BYOLEngine, fit
from byol_ray.session import resolve_paths, train_loader

TINY = ["model.projector_hidden_dim=128", "model.predictor_hidden_dim=128", "model.projector_dim=64",
        "data.loader=torch", "data.num_workers=1", "train.batch_size=64", "train.log_every_steps=1"]


def _setup(tmp_path, *extra):
    cfg = resolve_paths(load_config(["demo"], [*TINY, f"output_dir={tmp_path}", "run_name=t", *extra]))
    loader = train_loader(cfg, "demo", torch.device("cpu"))
    return cfg, loader, derive(cfg, loader.num_samples, 1)


class Recorder:
    def __init__(self):
        self.losses, self.states = [], {}

    def log(self, metrics, step):
        self.losses.append(metrics["loss"])

    def epoch_end(self, metrics, epoch, state):
        if state is not None:
            self.states[epoch] = state


def test_loop_learns_and_checkpoints_are_complete(tmp_path):
    cfg, loader, derived = _setup(tmp_path, "train.epochs=3", "train.checkpoint_every_epochs=1")
    rec = Recorder()
    result = fit(cfg, derived, loader, torch.device("cpu"), reporter=rec)
    assert result.steps == derived.total_steps == 3 * (loader.num_samples // 64)
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < first - 0.1, f"loss did not decrease: first {first:.3f} last {last:.3f}"
    assert sorted(rec.states) == [1, 2, 3]
    state = rec.states[3]
    for key in ("online", "target", "optimizer", "scaler", "step", "epoch", "rng", "config"):
        assert key in state
    assert state["step"] == result.steps and state["epoch"] == 3
    assert state["config"]["derived"]["total_steps"] == derived.total_steps
    # the target moved away from its initial copy but is not the online network
    online = result.engine.online
    assert any(not torch.equal(a, b) for a, b in zip(result.engine.target.encoder.parameters(), online.encoder.parameters()))


def test_resume_continues_bit_identically(tmp_path):
    cfg, loader, derived = _setup(tmp_path, "train.epochs=2")
    straight = Recorder()
    full = fit(cfg, derived, loader, torch.device("cpu"), reporter=straight)

    # interrupted after epoch 1: save through the real checkpoint file, reload, continue
    cfg1 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1))
    first = Recorder()
    part = fit(cfg1, derived, loader, torch.device("cpu"), reporter=first)
    path = save_checkpoint(part.engine.state_dict(), tmp_path / "ckpt" / "epoch_0001" / "state.pt")
    assert latest_checkpoint(tmp_path / "ckpt") == path
    state = load_checkpoint(path)
    resumed = Recorder()
    rest = fit(cfg, derived, loader, torch.device("cpu"), reporter=resumed, state=state)

    assert first.losses + resumed.losses == straight.losses
    assert rest.steps == full.steps
    for a, b in zip(full.engine.state_dict()["online"].values(), rest.engine.state_dict()["online"].values()):
        assert torch.equal(a, b)
    for a, b in zip(full.engine.state_dict()["target"].values(), rest.engine.state_dict()["target"].values()):
        assert torch.equal(a, b)


def test_resume_restores_target_as_saved_not_from_online(tmp_path):
    cfg, loader, derived = _setup(tmp_path, "train.epochs=1")
    engine = BYOLEngine(cfg, derived, torch.device("cpu"))
    with torch.no_grad():
        for p in engine.target.parameters():
            p.add_(1.0)  # a target that differs from online, as after training
    state = engine.state_dict()
    fresh = BYOLEngine(cfg, derived, torch.device("cpu"))
    fresh.load_state_dict(state)
    for a, b in zip(fresh.target.parameters(), engine.target.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.target.encoder.parameters(), fresh.online.encoder.parameters()))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "state.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
