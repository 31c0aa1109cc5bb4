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


class Interrupt(Exception):
    pass


class StepCheckpoints(Recorder):
    """Keeps mid-epoch checkpoints (through the real file) and dies right after the one at ``stop_at``."""

    def __init__(self, folder, stop_at=None):
        super().__init__()
        self.folder, self.stop_at, self.epoch_rows = folder, stop_at, []

    def checkpoint(self, metrics, state, notice):
        path = save_checkpoint(state, self.folder / f"step_{state['step']}" / "state.pt")
        if state["step"] == self.stop_at:
            raise Interrupt(path)

    def epoch_end(self, metrics, epoch, state):
        self.epoch_rows.append(metrics)
        super().epoch_end(metrics, epoch, state)


@pytest.mark.parametrize("backend", ["torch", "memory"])
def test_mid_epoch_resume_gives_the_same_loss_sequence(tmp_path, backend):
    """train.checkpoint_every_steps: a run killed right after a mid-epoch checkpoint and resumed from it
    continues with exactly the losses (and epoch means) of an uninterrupted run, on CPU."""
    cfg, loader, derived = _setup(tmp_path, "train.epochs=2", "train.checkpoint_every_steps=5",
                                  f"data.loader={backend}")
    assert derived.steps_per_epoch > 7  # the checkpoint at step 10 lies inside epoch 1
    straight = StepCheckpoints(tmp_path / "a")
    fit(cfg, derived, loader, torch.device("cpu"), reporter=straight)
    assert sorted(p.name for p in (tmp_path / "a").iterdir())[:2] == ["step_10", "step_15"]

    first = StepCheckpoints(tmp_path / "b", stop_at=10)
    with pytest.raises(Interrupt) as stopped:
        fit(cfg, derived, loader, torch.device("cpu"), reporter=first)
    state = load_checkpoint(stopped.value.args[0])
    assert state["step"] == 10 and state["epoch"] == 0 and state["epoch_prefix"]["steps"] == 10
    resumed = StepCheckpoints(tmp_path / "c")
    fit(cfg, derived, loader, torch.device("cpu"), reporter=resumed, state=state)

    assert len(first.losses) == 10
    assert first.losses + resumed.losses == straight.losses  # bit-identical, step by step
    # the first epoch's means cover all its steps, those before the interruption included
    for key in ("epoch_loss", "epoch_classifier_acc"):
        assert resumed.epoch_rows[0][key] == pytest.approx(straight.epoch_rows[0][key], rel=1e-5)


def test_augmentation_of_a_sample_does_not_depend_on_the_world_size():
    """Each rank keeps its rows of parameters drawn for the whole global batch (share=(offset, global))."""
    from byol_ray.augment import ViewAugment, augment_view
    from byol_ray.dist import batch_share

    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    whole = augment_view(images, ViewAugment(), torch.Generator().manual_seed(3))
    for rank in range(3):  # 3 does not divide 10: shares of 4, 3, 3
        offset, size = batch_share(10, 3, rank)
        part = augment_view(images[offset:offset + size], ViewAugment(), torch.Generator().manual_seed(3),
                            share=(offset, 10))
        assert torch.allclose(part, whole[offset:offset + size], atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "memory"])
def test_global_batches_do_not_depend_on_the_world_size(backend):
    """An elastic run continues the same sequence of global batches: at every step, the ranks' batches put end
    to end (and each sample's crops) are the single worker's batch, whether or not the epoch starts mid-way,
    also for a world size that does not divide the global batch."""
    from byol_ray.data.loaders import build_train_loader
    from byol_ray.dist import batch_share

    def batches(rank, world, skip):
        loader = build_train_loader("demo", backend=backend, batch_size=batch_share(32, world, rank)[1],
                                    global_batch=32, resolution=16, num_workers=0, seed=5, distributed=world > 1,
                                    rank=rank, world_size=world)
        loader.set_epoch(1, skip_batches=skip)
        return [(v1, lab) for (v1, _, lab), _ in zip(loader, range(3))]

    one = batches(0, 1, 2)
    for world in (2, 3):
        ranks = [batches(r, world, 2) for r in range(world)]
        for step in range(3):
            v1, labels = one[step]
            assert torch.equal(torch.cat([ranks[r][step][1] for r in range(world)]), labels)
            assert torch.equal(torch.cat([ranks[r][step][0] for r in range(world)]), v1)


def test_unequal_shares_weight_gradients_to_the_global_mean():
    """With a world size that does not divide the batch, DDP's average of the ranks' weighted gradients is the
    gradient of the global batch's mean loss (two gloo ranks in threads would need a process group: here the
    weighting itself is checked on a linear model)."""
    from byol_ray.dist import batch_share

    torch.manual_seed(0)
    x, w = torch.randn(10, 4), torch.randn(4, requires_grad=True)
    (x @ w).pow(2).mean().backward()
    full = w.grad.clone()
    grads = []
    for rank in range(3):
        w.grad = None
        offset, size = batch_share(10, 3, rank)
        weight = size * 3 / 10  # as BYOLEngine.train_step weights its loss
        ((x[offset:offset + size] @ w).pow(2).mean() * weight).backward()
        grads.append(w.grad.clone())
    assert torch.allclose(torch.stack(grads).mean(0), full, atol=1e-6)  # DDP's mean over ranks


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
