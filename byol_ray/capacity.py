"""Does the run's worker group fit the cluster, and if not yet, will it? Checked before anything is written.

A cluster that scales to zero has no GPU node when the run is submitted: the run asks the autoscaler for its
workers (``ray.autoscaler.sdk.request_resources``) and waits, with a progress line every
``PROGRESS_EVERY_S``, up to ``ray.wait_for_workers_s``; the request is withdrawn once the capacity is there
(or the wait is over), so that idle nodes are released again after the run. What can never fit is refused at
once: a worker larger than every node type the autoscaler may start, or more workers than all of them
together at their ``max_workers``.

``ray.wait_for_workers_s=-1`` (the default) waits ``DEFAULT_WAIT_S`` when the cluster has an autoscaler (it
has reported its node types to Ray) and not at all otherwise, where nothing would arrive; an explicit number
of seconds waits that long on any cluster (nodes joined by hand, a KubeRay cluster scaled by an operator).
The embedded default's in-process Ray never grows and never waits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from byol_ray.config import Config, ConfigError
from byol_ray.progress import say

DEFAULT_WAIT_S = 900.0  # a spot GPU node: the instance request, boot, image pull, `ray start`
PROGRESS_EVERY_S = 15.0


@dataclass(frozen=True)
class NodeGroup:
    """One node type the autoscaler may start: its resources per node and how many of it at most."""

    name: str
    resources: dict[str, float]
    max_count: int  # -1: no limit


def worker_bundle(cfg: Config) -> dict[str, float]:
    return {"CPU": float(cfg.ray.cpus_per_worker), **({"GPU": 1.0} if cfg.ray.use_gpu else {})}


def starting_workers(cfg: Config) -> int:
    """The group Ray Train starts with: an elastic run starts with what fits, down to ray.min_workers."""
    return cfg.ray.min_workers or cfg.ray.num_workers


def shortfall(cfg: Config, total: dict[str, float]) -> str | None:
    """What the cluster's resources right now lack for the run's start (one line naming the keys), or None."""
    workers, cpus = starting_workers(cfg), cfg.ray.cpus_per_worker
    if cfg.ray.use_gpu and total.get("GPU", 0) < workers:
        return (f"ray.use_gpu=true asks for {workers} GPU worker(s) but the cluster has {int(total.get('GPU', 0))} "
                "GPU(s); set ray.use_gpu=false (CPU training) or lower ray.num_workers")
    if total.get("CPU", 0) < workers * cpus:
        return (f"ray.num_workers={workers} x ray.cpus_per_worker={cpus} needs {workers * cpus} CPUs but the cluster "
                f"has {total.get('CPU', 0):g}; lower ray.num_workers or ray.cpus_per_worker")
    if cfg.data.val and cfg.eval.every_epochs and total.get("CPU", 0) < workers * cpus + cfg.eval.cpus:
        # the validation task would wait forever for its CPUs, and the run's end waits for the validation
        return (f"validation (data.val) needs eval.cpus={cfg.eval.cpus} CPU(s) beside the {workers * cpus} of the "
                f"workers, but the cluster has {total.get('CPU', 0):g}; lower eval.cpus, ray.cpus_per_worker or "
                "ray.num_workers, or set eval.every_epochs=0 (no validation)")
    return None


def never_fits(cfg: Config, groups: list[NodeGroup], alive: list[dict[str, float]]) -> str | None:
    """Why the worker group can never be placed, whatever the autoscaler starts (None: it can be)."""
    bundle = worker_bundle(cfg)

    def per_node(resources: dict[str, float]) -> int:  # workers of this shape one node holds
        return int(min(resources.get(k, 0.0) // v for k, v in bundle.items()))

    if not any(per_node(g.resources) for g in groups) and not any(per_node(n) for n in alive):
        sizes = ", ".join(f"{g.name} ({', '.join(f'{v:g} {k}' for k, v in sorted(g.resources.items()) if k in ('CPU', 'GPU'))})"
                          for g in groups)
        return (f"one worker needs {', '.join(f'{v:g} {k}' for k, v in bundle.items())} on one node, more than any "
                f"node type of the cluster has: {sizes}; lower ray.cpus_per_worker or add a larger node type")
    if any(g.max_count < 0 for g in groups):
        return None
    most = sum(per_node(n) for n in alive) + sum(per_node(g.resources) * g.max_count for g in groups)
    if most < starting_workers(cfg):
        return (f"ray.num_workers={starting_workers(cfg)} workers of {bundle} do not fit even with every node type at "
                f"its max_workers (room for {most}); lower ray.num_workers or raise max_workers in the cluster config")
    return None


def node_groups() -> list[NodeGroup] | None:
    """The node types the cluster's autoscaler reported to Ray, or None when it has no autoscaler."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or unusual cluster: treat it as one without an autoscaler
        return None
    if not config or not config.node_group_configs:
        return None
    return [NodeGroup(g.name, {k: float(v) for k, v in g.resources.items()}, g.max_count)
            for g in config.node_group_configs]


def _alive_node_resources() -> list[dict[str, float]]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def ensure(cfg: Config, *, embedded: bool) -> None:
    """Return once the run's worker group fits the cluster; raise ConfigError (one line, naming the key to change)
    when it never will or when ``ray.wait_for_workers_s`` ran out."""
    import ray

    missing = shortfall(cfg, ray.cluster_resources())
    if missing is None:
        return
    groups = None if embedded else node_groups()
    if groups is not None and (why := never_fits(cfg, groups, _alive_node_resources())):
        raise ConfigError(why)
    wait = cfg.ray.wait_for_workers_s
    if wait < 0:
        wait = DEFAULT_WAIT_S if groups else 0.0
    if embedded or wait == 0:
        grow = "" if embedded else "; on a cluster that grows, ray.wait_for_workers_s=SECONDS waits for its nodes"
        raise ConfigError(missing + grow)
    _wait_for_capacity(cfg, wait, missing, autoscaler=groups is not None)


def _wait_for_capacity(cfg: Config, wait_s: float, missing: str, *, autoscaler: bool) -> None:
    import ray
    from ray.autoscaler.sdk import request_resources

    bundles = [worker_bundle(cfg)] * starting_workers(cfg)
    if cfg.data.val and cfg.eval.every_epochs:
        bundles.append({"CPU": float(cfg.eval.cpus)})
    request_resources(bundles=bundles)  # a hint the autoscaler acts on at once (and ignored without one)
    asked = "asked the autoscaler for them" if autoscaler else "no autoscaler: waiting for nodes to join"
    say(f"waiting up to {wait_s:.0f} s (ray.wait_for_workers_s) for the cluster to grow: {missing.split(';')[0]}; "
        f"{asked}")
    start = last = time.monotonic()
    try:
        while True:
            time.sleep(1.0)
            missing = shortfall(cfg, ray.cluster_resources())
            elapsed = time.monotonic() - start
            if missing is None:
                say(f"the cluster has room for the workers after {elapsed:.0f} s")
                return
            if elapsed >= wait_s:
                raise ConfigError(f"{missing.split(';')[0]} after waiting {wait_s:.0f} s (ray.wait_for_workers_s) "
                                  "for the cluster to grow; check the autoscaler (`ray status`) or raise "
                                  "ray.wait_for_workers_s")
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                total = ray.cluster_resources()
                have = ", ".join(f"{total.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k in total or k == "CPU")
                say(f"still waiting for capacity: the cluster has {have} ({elapsed:.0f} s of {wait_s:.0f} s)")
    finally:
        request_resources(bundles=[])  # withdrawn: placed workers hold their nodes, idle ones may go again

