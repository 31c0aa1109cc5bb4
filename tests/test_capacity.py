"""What can never fit is refused at once, whatever the autoscaler may start (byol_ray/capacity.py)."""
from __future__ import annotations

import pytest

from byol_ray.capacity import NodeGroup, never_fits, shortfall
from byol_ray.config import load_config

P4D = NodeGroup("ray.worker.gpu.spot", {"CPU": 96.0, "GPU": 8.0, "memory": 1e12}, 8)
HEAD = {"CPU": 0.0, "memory": 3e10}


def _cfg(*overrides: str):
    return load_config(["demo"], ["ray.use_gpu=true", "data.val=", *overrides])


def test_a_group_that_fits_once_nodes_are_up_is_not_refused():
    cfg = _cfg("ray.num_workers=16", "ray.cpus_per_worker=10")
    assert "asks for 16 GPU worker(s) but the cluster has 0" in shortfall(cfg, HEAD)  # now: a wait, not a refusal
    assert never_fits(cfg, [P4D], [HEAD]) is None


def test_a_worker_larger_than_every_node_type_never_fits():
    why = never_fits(_cfg("ray.cpus_per_worker=128"), [P4D], [HEAD])
    assert "one worker needs 128 CPU, 1 GPU on one node, more than any node type" in why
    assert "ray.worker.gpu.spot (96 CPU, 8 GPU)" in why and "ray.cpus_per_worker" in why


def test_more_workers_than_every_node_type_at_its_max_never_fits():
    # 8 nodes x min(96 // 13, 8 // 1) = 8 x 7 = 56 workers at most
    why = never_fits(_cfg("ray.num_workers=57", "ray.cpus_per_worker=13"), [P4D], [HEAD])
    assert "room for 56" in why and "ray.num_workers" in why and "max_workers" in why
    assert never_fits(_cfg("ray.num_workers=56", "ray.cpus_per_worker=13"), [P4D], [HEAD]) is None
    unlimited = NodeGroup("any", P4D.resources, -1)
    assert never_fits(_cfg("ray.num_workers=1000", "ray.cpus_per_worker=13", "train.batch_size=4096"), [unlimited],
                      [HEAD]) is None


@pytest.mark.parametrize("value", ["-2", "ten"])
def test_a_bad_wait_is_one_line_naming_the_key(value):
    from byol_ray.config import ConfigError

    with pytest.raises(ConfigError, match="ray.wait_for_workers_s"):
        load_config(["demo"], [f"ray.wait_for_workers_s={value}"])
