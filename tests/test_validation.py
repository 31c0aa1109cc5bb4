"""Held-out validation of a checkpoint (byol_ray/validation.py) on real CIFAR-10 images: folders and .beton files,
the bank and held-out subsets, and where the result is recorded."""
from __future__ import annotations

import json

import pytest
import torch

from byol_ray.config import derive, load_config, to_dict
from byol_ray.engine import BYOLEngine

TINY = ["model.projector_hidden_dim=128", "model.predictor_hidden_dim=128", "model.projector_dim=64",
        "train.batch_size=64", "mlflow.enabled=false"]


def _state(tmp_path, train, val, *extra):
    cfg = load_config(["demo"], [*TINY, f"data.train={train}", f"data.val={val}", f"output_dir={tmp_path}",
                                 "run_name=v", *extra])
    engine = BYOLEngine(cfg, derive(cfg, 600, 1), torch.device("cpu"))
    state = engine.state_dict()
    state["config"] = to_dict(cfg, derive(cfg, 600, 1))
    return cfg, state


def test_knn_of_a_checkpoint_on_held_out_folders_with_subsets(tmp_path, cifar_small):
    from byol_ray import validation

    train, val = cifar_small
    cfg, state = _state(tmp_path, train, val, "eval.bank_size=100", "eval.val_size=50")
    result = validation.validate_state(state)
    assert (result["val_bank_size"], result["val_size"]) == (100, 50)  # class-stratified subsets of 600 and 200
    assert 0.0 <= result["val_knn_top1"] <= 1.0 and result["val_step"] == 0
    validation.record(cfg, result, None)
    assert validation.latest(tmp_path / "v") == json.loads(json.dumps(result))


def test_knn_of_a_checkpoint_on_beton_files_with_subsets(tmp_path, cifar_small):
    pytest.importorskip("ffcv")
    from byol_ray import validation
    from byol_ray.data.prepare import prepare

    train, val = cifar_small
    prepare(str(train), str(tmp_path / "train.beton"), max_resolution=32, progress=False)
    prepare(str(val), str(tmp_path / "val.beton"), max_resolution=32, progress=False)
    _, state = _state(tmp_path, tmp_path / "train.beton", tmp_path / "val.beton", "eval.bank_size=128",
                      "eval.val_size=0")
    result = validation.validate_state(state)
    assert (result["val_bank_size"], result["val_size"]) == (128, 200)  # a uniform subset of the .beton's 600
    assert 0.0 <= result["val_knn_top1"] <= 1.0


def test_unreadable_val_split_fails_before_training(tmp_path, cifar_small):
    from byol_ray.config import ConfigError
    from byol_ray.launch import check_data

    train, _ = cifar_small
    cfg = load_config(["demo"], [*TINY, f"data.train={train}", f"data.val={tmp_path}/nope", "data.loader=torch"])
    with pytest.raises(ConfigError, match="nope"):
        check_data(cfg)


def test_held_out_data_with_other_classes_or_a_truncated_file_is_refused_before_training(tmp_path, cifar_small):
    """kNN scores by label index: a data.val labelled with other classes would give a meaningless val_knn_top1
    (what Tune selects on), so it is refused up front, as is a truncated held-out .beton."""
    import shutil

    from byol_ray.config import ConfigError
    from byol_ray.data.prepare import prepare
    from byol_ray.validation import check_val

    train, val = cifar_small
    check_val(load_config(["demo"], [f"data.train={train}", f"data.val={val}"]))  # the same ten classes: fine
    fewer = tmp_path / "fewer"
    for name in sorted(p.name for p in val.iterdir())[:7]:
        shutil.copytree(val / name, fewer / name)
    with pytest.raises(ConfigError, match=r"data.val=.* has other classes than data.train .* 7 vs 10 classes, "
                                          r"only in data.train: \['horse', 'ship', 'truck'\]"):
        check_val(load_config(["demo"], [f"data.train={train}", f"data.val={fewer}"]))
    prepare(str(val), str(tmp_path / "val.beton"), progress=False, num_workers=1)
    cut = tmp_path / "cut.beton"
    cut.write_bytes((tmp_path / "val.beton").read_bytes()[:6000])
    with pytest.raises(ConfigError, match=r"data.val=.*cut.beton.* is truncated"):
        check_val(load_config(["demo"], [f"data.train={train}", f"data.val={cut}"]))
