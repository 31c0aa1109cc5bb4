"""Config: presets load, overrides apply, bad input is rejected early with the key named."""
import pytest
import yaml

from byol_ray.config import ConfigError, derive, from_dict, load_config, save_resolved, to_dict

PRESETS = ["demo", "cifar10_cpu", "cifar10_resnet18", "imagenet_resnet50_40ep", "imagenet_resnet50_100ep",
           "imagenet_resnet50_300ep", "imagenet_resnet50_1000ep"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config([name])
    assert cfg.train.epochs >= 1


@pytest.mark.parametrize("name,lr,wd,tau", [
    ("imagenet_resnet50_40ep", 0.45, 1e-6, 0.97), ("imagenet_resnet50_100ep", 0.45, 1e-6, 0.99),
    ("imagenet_resnet50_300ep", 0.30, 1e-6, 0.99), ("imagenet_resnet50_1000ep", 0.20, 1.5e-6, 0.996),
])
def test_imagenet_presets_carry_the_papers_numbers(name, lr, wd, tau):
    cfg = load_config([name])
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.train.tau_base) == (lr, wd, tau)
    assert cfg.train.batch_size == 4096 and cfg.model.encoder == "resnet50"
    assert derive(cfg, num_samples=1_281_167).peak_lr == pytest.approx(lr * 16)


def test_overrides_are_typed_and_nested():
    cfg = load_config(["demo"], ["train.epochs=3", "optim.base_lr=2e-1", "augment.view2.solarize_prob=0.5",
                                  "data.crop_scale=[0.5, 1]", "model.use_predictor=false"])
    assert cfg.train.epochs == 3 and cfg.optim.base_lr == 0.2
    assert cfg.augment.view2.solarize_prob == 0.5 and cfg.augment.view2.blur_prob == 0.0  # demo's value kept
    assert cfg.augment.view1.solarize_prob == 0.0
    assert cfg.data.crop_scale == (0.5, 1.0) and cfg.model.use_predictor is False


def test_unknown_key_names_the_key_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.weight_decy'.*did you mean 'optim.weight_decay'"):
        load_config(["demo"], ["optim.weight_decy=1e-6"])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"train.epocs.*did you mean 'train.epochs'"):
        load_config([str(path)])


@pytest.mark.parametrize("override,pattern", [
    ("train.epochs=ten", r"'train.epochs' = 'ten' must be an integer"),
    ("train.epochs=2.5", r"'train.epochs' = 2.5 must be an integer"),
    ("model.use_predictor=maybe", r"must be true or false"),
    ("train.precision=fp8", r"choose one of \['fp32', 'bf16', 'fp16'\]"),
    ("train.batch_size=-4", r"'train.batch_size' = -4 is out of range"),
    ("optim.base_lr=0", r"'optim.base_lr' = 0.0 is out of range"),
    ("train.tau_base=1.5", r"'train.tau_base' = 1.5 is out of range; allowed: \[0, 1\]"),
    ("model.encoder=resnet9", r"'model.encoder' = 'resnet9' is out of range"),
    ("augment.view1.blur_prob=2", r"blur_prob"),
    ("data.crop_scale=[0.5]", r"list of 2 numbers"),
    ("train=3", r"is a section"),
    ("nonsense", r"key.sub=value"),
    ("ray.torch_threads=-1", r"'ray.torch_threads' = -1 is out of range; allowed: >= 0 \(0 = ray.cpus_per_worker\)"),
])
def test_bad_values_are_rejected_with_the_key_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(["demo"], [override])


def test_a_workers_torch_threads_are_its_cpus_unless_set():
    from byol_ray.ray_train import worker_threads

    assert worker_threads(load_config(["demo"], ["ray.cpus_per_worker=4"])) == 4
    assert worker_threads(load_config(["demo"], ["ray.cpus_per_worker=4", "ray.torch_threads=1"])) == 1


def test_batch_must_give_every_worker_two_samples():
    with pytest.raises(ConfigError, match=r"fewer than 2 samples .* train.batch_size >= 10"):
        load_config(["demo"], ["ray.num_workers=5", "train.batch_size=8"])


def test_any_world_size_splits_the_global_batch_exactly():
    """Elastic runs may get any size: the shares cover the global batch, in order, sizes differing by <= 1."""
    from byol_ray.dist import batch_share

    cfg = load_config(["demo"], ["ray.num_workers=3", "ray.min_workers=1", "ray.max_failures=3",
                                 "train.batch_size=128"])
    assert derive(cfg, 1797, 3).steps_per_epoch == derive(cfg, 1797, 1).steps_per_epoch == 1797 // 128
    for world in (1, 2, 3, 5, 12):
        shares = [batch_share(128, world, r) for r in range(world)]
        assert [o for o, _ in shares] == [sum(s for _, s in shares[:r]) for r in range(world)]
        assert sum(s for _, s in shares) == 128 and max(s for _, s in shares) - min(s for _, s in shares) <= 1


def test_elastic_run_needs_failures_allowed():
    with pytest.raises(ConfigError, match=r"ray.max_failures=0 ends it at the first lost node"):
        load_config(["demo"], ["ray.num_workers=2", "ray.min_workers=1"])


def test_missing_file_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"config file 'nope.yaml' not found.*preset name \(cifar10_cpu, cifar10_resnet18, demo"):
        load_config(["nope.yaml"])


def test_derived_values_and_saved_yaml_round_trip(tmp_path):
    cfg = load_config(["demo"], ["train.batch_size=100", "train.epochs=4", "optim.warmup_epochs=1.5"])
    d = derive(cfg, num_samples=1797, world_size=2)
    assert (d.per_worker_batch, d.steps_per_epoch, d.total_steps, d.warmup_steps) == (50, 17, 68, 26)
    assert d.peak_lr == pytest.approx(1.0 * 100 / 256)
    path = save_resolved(cfg, d, tmp_path / "run" / "config.yaml")
    saved = yaml.safe_load(path.read_text())
    assert saved["derived"]["total_steps"] == 68
    assert to_dict(from_dict(saved)) == to_dict(cfg)


def test_batch_larger_than_data_set_fails():
    cfg = load_config(["demo"], ["train.batch_size=4096"])
    with pytest.raises(ConfigError, match="larger than the data set"):
        derive(cfg, num_samples=1797)


def test_on_and_off_choices_survive_yaml_booleans():
    """YAML 1.1 reads a bare on/off as true/false: `model.sync_bn=on`, as the error messages suggest it, must
    still mean "on" (it was refused with "True is not allowed; choose one of ['auto', 'on', 'off']")."""
    from byol_ray.config import load_config

    assert load_config(["demo"], ["model.sync_bn=off"]).model.sync_bn == "off"
    assert load_config(["demo"], ["model.sync_bn=on", "ray.use_gpu=true"]).model.sync_bn == "on"
