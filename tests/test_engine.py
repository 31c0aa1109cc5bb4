"""End-to-end: the real loop on a tiny encoder and real images learns, checkpoints and resumes bit-identically."""
import dataclasses

import pytest
import torch

from byol_ray.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from byol_ray.config import derive, load_config
from byol_ray.engine import BYOLEngine, NullReporter, Reporter, fit
from byol_ray.data.loaders import run_loader
from byol_ray.run_folder import resolve_paths

TINY = ["model.projector_hidden_dim=128", "model.predictor_hidden_dim=128", "model.projector_dim=64",
        "data.loader=torch", "data.num_workers=1", "train.batch_size=64", "train.log_every_steps=1"]


def _setup(tmp_path, *extra):
    cfg = resolve_paths(load_config(["demo"], [*TINY, f"output_dir={tmp_path}", "run_name=t", *extra]))
    loader = run_loader(cfg, "demo", torch.device("cpu"))
    return cfg, loader, derive(cfg, loader.num_samples, 1)


class Recorder(Reporter):
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


# ----------------------------------------------------------------------------- the reporter contract


class CallLog(Reporter):
    """Records which reporter methods the loop called (log, poll, checkpoint, epoch_end) and at which steps."""

    def __init__(self):
        self.calls = []

    def log(self, metrics, step):
        self.calls.append(("log", step))

    def poll(self, step):
        self.calls.append(("poll", step))
        return None

    def epoch_end(self, metrics, epoch, state):
        self.calls.append(("epoch_end", epoch, state is not None))


def test_reporter_defaults_are_no_ops_and_only_an_override_of_checkpoint_writes_checkpoints():
    base = Reporter()
    assert base.log({"loss": 1.0}, 1) is None and base.epoch_end({}, 1, None) is None
    assert base.checkpoint({}, {}, None) is None and base.replay({}) is None
    assert base.poll(3) is None
    assert not base.writes_checkpoints and not NullReporter().writes_checkpoints and not Recorder().writes_checkpoints
    assert StepCheckpoints(None).writes_checkpoints  # overrides checkpoint
    from byol_ray.tracker import NullTracker, TrackingReporter
    from byol_ray.train import LocalReporter

    assert issubclass(LocalReporter, Reporter) and TrackingReporter(Recorder(), NullTracker()).writes_checkpoints


def test_a_reporter_without_checkpoint_gets_no_mid_epoch_state(tmp_path, monkeypatch):
    """As before the base class: without an override of ``checkpoint`` the loop builds no mid-epoch state (no
    state_dict, no collective epoch means) even when train.checkpoint_every_steps says one is due; poll is
    still called after every step, and the epoch ends still get their checkpoint state."""
    cfg, loader, derived = _setup(tmp_path, "train.epochs=1", "train.checkpoint_every_steps=2",
                                  "train.log_every_steps=3")
    states = []
    original = BYOLEngine.state_dict
    monkeypatch.setattr(BYOLEngine, "state_dict", lambda self: states.append(self.step) or original(self))
    rec = CallLog()
    fit(cfg, derived, loader, torch.device("cpu"), reporter=rec)
    steps = derived.steps_per_epoch
    assert states == [steps]  # the epoch end's alone
    assert [c[1] for c in rec.calls if c[0] == "poll"] == list(range(1, steps + 1))
    assert [c[1] for c in rec.calls if c[0] == "log"] == list(range(3, steps + 1, 3))
    assert rec.calls[-1] == ("epoch_end", 1, True)


def test_fit_refuses_a_reporter_that_is_not_a_reporter(tmp_path):
    cfg, loader, derived = _setup(tmp_path, "train.epochs=1")

    class Duck:
        def log(self, metrics, step):
            pass

        def epoch_end(self, metrics, epoch, state):
            pass

    with pytest.raises(TypeError, match="must subclass byol_ray.engine.Reporter"):
        fit(cfg, derived, loader, torch.device("cpu"), reporter=Duck())


def test_step_rows_and_mid_epoch_checkpoint_rows_keep_their_fields(tmp_path):
    """The helpers that build the step row and the mid-epoch checkpoint's metrics keep every field."""
    cfg, loader, derived = _setup(tmp_path, "train.epochs=1", "train.checkpoint_every_steps=4")

    class Rows(StepCheckpoints):
        def __init__(self, folder):
            super().__init__(folder)
            self.rows, self.partials = [], []

        def log(self, metrics, step):
            self.rows.append((step, metrics))

        def checkpoint(self, metrics, state, notice):
            self.partials.append((metrics, state["epoch_prefix"]))

    rec = Rows(tmp_path / "ck")
    fit(cfg, derived, loader, torch.device("cpu"), reporter=rec)
    step, row = rec.rows[0]
    assert step == 1
    assert list(row) == ["loss", "projection_std", "classifier_loss", "classifier_acc", "lr", "tau", "images_per_s",
                         "step_time_s", "epoch", "world_size"]
    assert row["epoch"] == pytest.approx(1 / derived.steps_per_epoch) and row["world_size"] == 1
    metrics, prefix = rec.partials[0]
    assert prefix["steps"] == 4 and metrics["step"] == 4 and metrics["epoch"] == pytest.approx(4 / derived.steps_per_epoch)
    assert metrics["epoch_loss"] == prefix["means"]["epoch_loss"]
    assert metrics["epoch_loss"] == pytest.approx(sum(m["loss"] for _, m in rec.rows[:4]) / 4, rel=1e-5)


def test_one_network_build_serves_the_engine_and_the_registry(tmp_path):
    """byol.build_networks is the one build: the registry's encoder of an engine state is the engine's."""
    from byol_ray.byol import build_networks
    from byol_ray.registry import encoder_from_checkpoint

    cfg, _, derived = _setup(tmp_path, "train.epochs=1")
    engine = BYOLEngine(cfg, derived, torch.device("cpu"))
    torch.manual_seed(cfg.train.seed)
    online, target = build_networks(cfg.model)
    assert all(torch.equal(a, b) for a, b in zip(online.state_dict().values(), engine.online.state_dict().values()))
    assert list(target.state_dict()) == list(engine.target.state_dict())
    encoder = encoder_from_checkpoint(engine.state_dict())
    assert not encoder.training
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(),
                                                 engine.online.encoder.state_dict().values()))

