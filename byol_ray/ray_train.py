"""The Ray Train launcher: one TorchTrainer worker = one rank of the run; the driver checks and launches."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from byol_ray import dist, session, validation
from byol_ray.checkpoint import CHECKPOINT_NAME, checkpoint_dir_name, load_checkpoint, save_checkpoint
from byol_ray.config import Config, from_dict, to_dict, validation_due
from byol_ray.engine import Reporter
from byol_ray.history import append_history
from byol_ray.launch import check_start, cleanup_on_failure
from byol_ray.progress import ProgressPrinter, say
from byol_ray.progress import VERBOSE_ENV, verbose
from byol_ray.resume import announce_resume, check_new_or_resume, load_resume_state, unrecorded_resume_state
from byol_ray.run_folder import (RunOutcome, checkpoint_dir, forget_run_id, read_outcome, run_dir, storage_root,
                                 write_config)
from byol_ray.run_tags import SUBMISSION_ID_ENV, ray_job_submission_id
from byol_ray.signals import sigterm_raises
from byol_ray.storage import Location, is_uri

class RayReporter(Reporter):
    """Rank 0 prints progress and appends the history; every rank calls ``ray.train.report`` at epoch ends
    and mid-epoch checkpoints (a report is a barrier), rank 0 with the checkpoint.

    It also polls Ray Train for an imminent preemption every ``ray.preemption_poll_steps`` steps (a
    collective call, so every rank polls at the same steps) and turns a new notice into a checkpoint at
    once; Ray then restarts the group from it on the nodes that remain.
    """

    def __init__(self, rank: int, printer: ProgressPrinter, folder: Location, cfg: Config) -> None:
        self.rank, self.printer, self.folder, self.cfg = rank, printer, folder, cfg
        self.seen_preemptions: set[tuple[float, float]] = set()  # (deadline_ms, preempted ranks) acted on
        self.pending_notice: dict[str, Any] | None = None  # seen by poll, its checkpoint not yet committed
        self.poll_time_s, self.polls = 0.0, 0
        upload = cfg.ray.checkpoint_upload
        self.upload_async = upload == "async" or (upload == "auto" and is_uri(storage_root(cfg)))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0:
            self.printer(metrics, step)

    def epoch_end(self, metrics: dict[str, float], epoch: int, state: dict[str, Any] | None) -> None:
        if self.rank == 0:
            append_history(self.folder, metrics)
        self._report(metrics, state, checkpoint_dir_name(epoch), validate=validation_due(self.cfg, epoch))
        if state is not None and self.pending_notice is not None:  # a notice at an epoch's last step lands here
            self._await_commit(self.pending_notice, state["step"])

    def checkpoint(self, metrics: dict[str, float], state: dict[str, Any], notice: dict[str, Any] | None) -> None:
        self._report(metrics, state, checkpoint_dir_name(state["epoch"], state["step"]), validate=False)
        if notice is not None:
            self._await_commit(notice, state["step"])

    def _await_commit(self, notice: dict[str, Any], step: int) -> None:
        """Ray Train commits a checkpoint only once its controller has collected every rank's report; a node that
        dies before that takes the checkpoint with it (observed). So wait, well inside the deadline, until the
        notice's checkpoint is committed: only then is the notice's step safe."""
        import ray.train
        from ray.train import CheckpointConsistencyMode

        self.pending_notice = None
        left = notice.get("deadline_s", float("nan"))
        wait = min(30.0, left / 2) if left == left and left > 0 else 30.0
        start = time.perf_counter()
        try:
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                   timeout_s=wait)
            committed = f"committed after {time.perf_counter() - start:.1f} s"
            notice["committed_at"] = time.time()  # MLflow records it (tracker.TrackingReporter)
        except Exception as exc:  # noqa: BLE001 - training goes on; the previous checkpoint still stands
            committed = f"not confirmed within {wait:.0f} s ({type(exc).__name__})"
        if self.rank == 0:
            say(f"{notice['event']} notice at step {step}: checkpoint written now "
                        f"({left:.0f} s before the deadline), {committed}")

    def poll(self, step: int) -> dict[str, Any] | None:
        """A new preemption notice (identical on every rank), or None. Cheap: one call every N steps.

        ``get_preemption_info`` is a barrier of Ray Train's that hands every rank rank 0's view. The ranks also
        agree on the notice themselves, over the process group that the training step uses anyway (one small
        all-gather per poll), so that they act on it at the same step whatever Ray's barrier does during a drain
        (with relaxed barriers, once seen: rank 0 took the notice while the other rank went on to the next step).
        """
        import ray.train

        if step % self.cfg.ray.preemption_poll_steps:
            return None
        start = time.perf_counter()
        info = ray.train.get_preemption_info()
        key = (float(info.deadline_ms or 0), float(len(info.preempted_ranks))) if info is not None else None
        local = [1.0, *key] if key is not None and key not in self.seen_preemptions else [0.0, 0.0, 0.0]
        agreed = dist.gather(torch.tensor(local, dtype=torch.float64, device=_collective_device(self.cfg)))
        self.poll_time_s, self.polls = self.poll_time_s + time.perf_counter() - start, self.polls + 1
        seen = agreed[agreed[:, 0] > 0]
        if not len(seen):
            return None
        deadline_ms, ranks = float(seen[:, 1].min()), float(seen[:, 2].max())  # the earliest deadline any rank saw
        self.seen_preemptions.add((deadline_ms, ranks))
        if key is not None:
            self.seen_preemptions.add(key)
        deadline_s = deadline_ms / 1000 - time.time() if deadline_ms else float("nan")
        nodes = info.preempted_node_ids if info is not None else []
        self.pending_notice = {"event": "preemption", "deadline_s": deadline_s, "ranks": int(ranks),
                               "nodes": ",".join(n[:12] for n in nodes), "step": step, "seen_at": time.time()}
        return self.pending_notice

    def _report(self, metrics: dict[str, float], state: dict[str, Any] | None, name: str, *, validate: bool) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        if self.rank == 0 and self.cfg.data.val and self.cfg.eval.every_epochs:
            # the newest held-out result so far (validation runs beside training, so it lags by a checkpoint or
            # so); NaN until the first one: Tune needs its metric in every report
            latest = validation.latest(self.folder) or {}
            metrics = {**metrics, validation.METRIC: latest.get(validation.METRIC, float("nan")),
                       "val_step": latest.get("val_step", -1)}
        if state is None or self.rank != 0:
            ray.train.report(metrics)
            return
        # ASYNC: Ray copies the folder in the background and deletes it afterwards, so it must outlive this call
        tmp = tempfile.mkdtemp(prefix="byol-ckpt-")
        try:
            save_checkpoint(state, Path(tmp) / CHECKPOINT_NAME, durable=False)  # a staging copy; Ray uploads it
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name,
                             checkpoint_upload_mode=CheckpointUploadMode.ASYNC if self.upload_async
                             else CheckpointUploadMode.SYNC, validation=validate)
        finally:
            if not self.upload_async:
                shutil.rmtree(tmp, ignore_errors=True)

    def replay(self, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report(metrics if self.rank == 0 else {})


def _collective_device(cfg: Config) -> torch.device:
    """Where a tensor for the workers' process group must live: NCCL moves only GPU tensors."""
    if cfg.ray.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def same_start_on_every_rank(state: dict[str, Any] | None, device: torch.device) -> None:
    """Raise unless every rank continues from the same step. Each rank reads its checkpoint itself (Ray's restore
    copies it to every worker; without a record, each lists the run folder), and a rank whose copy cannot be read
    falls back to an older one alone. Ranks that disagree would train different steps and wait forever in each
    other's collectives; the attempt fails instead, naming the steps, and Ray Train retries it
    (``ray.max_failures``)."""
    mine = torch.tensor([-1.0 if state is None else float(state["step"])], dtype=torch.float64, device=device)
    steps = [int(v) for v in dist.gather(mine)[:, 0].tolist()]
    if len(set(steps)) > 1:
        seen = ", ".join(f"rank {r}: {'step 0 (no checkpoint)' if s < 0 else f'step {s}'}" for r, s in enumerate(steps))
        raise RuntimeError(f"the workers would resume from different checkpoints ({seen}): a checkpoint that one "
                           "worker could read was unreadable to another; this attempt stops so that Ray Train can "
                           "retry it (ray.max_failures)")


def validate_checkpoint(checkpoint, **_: Any) -> dict[str, float]:
    """Ray Train's validation function (``ValidationConfig``): runs in its own task while training goes on."""
    with checkpoint.as_directory() as folder:
        state = load_checkpoint(folder, map_location="cpu")
    torch.set_num_threads(from_dict(state["config"]).eval.cpus)  # the task's own CPUs, not the host's
    metrics = validation.validate_state(state)
    validation.record(from_dict(state["config"]), metrics, state.get("mlflow_run_id"))
    return metrics


def quiet_train_reports() -> None:
    """Train V2 logs every report's whole metrics dict at INFO, under a logger named after its file."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its output stays as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def worker_threads(cfg: Config) -> int:
    """torch's intra-op threads in a Ray Train worker: ``ray.torch_threads``, else its ``ray.cpus_per_worker``."""
    return cfg.ray.torch_threads or cfg.ray.cpus_per_worker


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function: what only Ray knows (rank, device, the checkpoint to resume), then the run."""
    import ray.train
    import ray.train.torch

    if not verbose():
        quiet_train_reports()
    cfg = from_dict(config)
    ctx = ray.train.get_context()
    torch.set_num_threads(worker_threads(cfg))  # the worker's own CPU budget, not the host's
    where = session.Placement(device=ray.train.torch.get_device(), rank=ctx.get_world_rank(),
                              world_size=ctx.get_world_size(), local_rank=ctx.get_local_rank())
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            # an unreadable one (truncated in a crash) falls back to the newest intact checkpoint of the run
            state = load_resume_state(cfg, where.device, restored=ckpt_dir, restored_name=Path(checkpoint.path).name,
                                      announce=where.rank == 0)
        if where.rank == 0:
            say(f"resuming from epoch {state['epoch']}, step {state['step']}")
    else:  # none recorded, yet the run folder may hold some (a controller stopped before registering them)
        state = unrecorded_resume_state(cfg, where.device, announce=where.rank == 0)
    same_start_on_every_rank(state, _collective_device(cfg))
    folder = run_dir(cfg)
    session.run(cfg, where, state=state, make_reporter=lambda printer: RayReporter(where.rank, printer, folder, cfg))


def storage_args(root: Location) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem``) for Ray's ``RunConfig``: an object-store location is handed
    over as its filesystem plus the path inside it, so that a URI's query (``?endpoint_override=...``) is never
    mangled by path joins."""
    if not root.remote:
        return {"storage_path": root.path}
    return {"storage_path": root.path, "storage_filesystem": root.fs}


def check_resources(cfg: Config) -> None:
    """Fail fast instead of waiting forever for a worker group the cluster cannot place; wait (up to
    ray.wait_for_workers_s) for one a growing cluster will place (capacity.py)."""
    from byol_ray import capacity
    from byol_ray.ray_connect import embedded

    capacity.ensure(cfg, embedded=embedded())


def _interruptible(trainer_cls):
    """``trainer_cls`` whose Ctrl-C ends ``fit()`` with ``KeyboardInterrupt`` once Ray has aborted the run's
    controller and workers: the launcher then marks the MLflow run KILLED and the CLI exits 130. (Train V2's own
    SIGINT handler aborts the same way, then ends the process with ``sys.exit(0)`` from inside the handler,
    which surfaces as exit 1 with no word said.) Under Tune, trainers run in threads and keep Ray's behaviour."""
    if not hasattr(trainer_cls, "_register_sigint_handler"):  # another Ray layout: its own handling stays
        return trainer_cls

    class InterruptibleTrainer(trainer_cls):
        def _register_sigint_handler(self, controller) -> None:
            import ray

            def on_sigint(signum, frame):
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C cuts the abort short
                try:
                    ray.get(controller.abort.remote(), timeout=60)
                except Exception:  # noqa: BLE001 - the controller exits as it aborts (RayActorError)
                    pass
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

    return InterruptibleTrainer


def build_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer for ``cfg`` (Tune trials add a metrics-forwarding callback).

    Checkpoints land in :func:`byol_ray.run_folder.checkpoint_dir` (``<storage root>/<run_name>/checkpoints``), the same
    place a ``--no-ray`` run writes them.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.validation_config import ValidationConfig

    from byol_ray.process_group import BoundTorchConfig

    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", VERBOSE_ENV: os.environ.get(VERBOSE_ENV, ""),
           SUBMISSION_ID_ENV: ray_job_submission_id()}
    r = cfg.ray
    # elastic between ray.min_workers and ray.num_workers; the recipe does not depend on the size (engine.fit)
    elastic = 0 < r.min_workers < r.num_workers
    validation = None
    if cfg.data.val and cfg.eval.every_epochs > 0:
        # its own CPUs, outside any placement group it would otherwise inherit (a Tune trial's holds no CPU)
        validation = ValidationConfig(fn=validate_checkpoint, ray_remote_kwargs={
            "num_cpus": cfg.eval.cpus, "scheduling_strategy": "DEFAULT"})
    return _interruptible(TorchTrainer)(
        train_worker,
        train_loop_config=to_dict(cfg),
        torch_config=BoundTorchConfig(backend="nccl" if r.use_gpu else "gloo"),  # store on the node address only
        scaling_config=ScalingConfig(num_workers=(r.min_workers, r.num_workers) if elastic else r.num_workers,
                                     use_gpu=r.use_gpu, resources_per_worker={"CPU": r.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=r.resize_check_s),
        validation_config=validation,
        run_config=RunConfig(
            name="checkpoints", **storage_args(checkpoint_dir(cfg).parent),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            # preemptions are retried without limit (Ray's default), apart from ray.max_failures for real errors.
            # Ray Train's barriers stay strict during a drain (relax_collectives_on_preemption=False, Ray's default):
            # a drained node's workers live until its deadline, so they take part in the notice's poll and report.
            # Relaxed, Ray 2.60 can deadlock the group (docs/design.md, "Facts about the tools", spot notices).
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures, controller_failure_limit=3,
                                         max_preemption_failures=-1, relax_collectives_on_preemption=False),
            # Train V2 re-routes print() through its logger, which shows every progress line twice.
            worker_runtime_env={"env_vars": env},
            # the controller's INFO lines (resource requests, worker group, each validation task) behind --verbose
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )


def launch(cfg: Config, *, resume: bool = False) -> RunOutcome:
    """Run ``cfg`` under a TorchTrainer; the same call serves a laptop, ``ray job submit`` and KubeRay.

    Args:
        cfg: the config as given (relative paths are resolved here, after the checks that need them).
        resume: continue the run named ``cfg.run_name`` (Ray restores the latest checkpoint; the engine
            continues its schedules, target and loader epoch).

    Returns:
        The run's :class:`~byol_ray.run_folder.RunOutcome`, as its rank 0 wrote it in the run folder.
    """
    given, cfg = cfg, check_start(cfg, on_ray=True)  # every check before anything is written
    check_new_or_resume(cfg, resume)
    check_resources(cfg)
    if resume:
        announce_resume(cfg, ray_picks=True)
    run_dir(cfg).mkdir()
    if not resume:  # saved before any worker starts, so --resume works even after an early crash
        write_config(cfg)
        forget_run_id(cfg)
    with cleanup_on_failure(cfg, resume=resume, continue_with=f"byol-ray train --resume {cfg.run_name} "
                                                               f"output_dir={given.output_dir}"):
        with sigterm_raises(), _sigint_restored():
            result = build_trainer(cfg).fit()
        if result.error:
            raise result.error
    outcome = read_outcome(cfg)
    # the final checkpoint's validation, as Ray Train's result carries it (it finishes after the last report)
    outcome.metrics.update({k: v for k, v in (result.metrics or {}).items() if k.startswith("val_")})
    session.print_summary(cfg, outcome)
    return outcome


@contextlib.contextmanager
def _sigint_restored():
    """Whatever SIGINT handler ``fit()`` installs is gone when it returns (a later Ctrl-C is Python's again)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
