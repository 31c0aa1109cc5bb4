"""Learning-rate and target-decay (tau) schedules: pure functions of the global step."""
from __future__ import annotations

import math


def learning_rate(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to ``peak_lr``, then cosine decay to 0 at ``total_steps``.

    Matches DeepMind's ``byol/utils/schedules.py`` (``learning_schedule``): during warmup the lr is
    ``peak_lr * step / warmup_steps``; afterwards ``peak_lr * (1 + cos(pi * t)) / 2`` with ``t`` the
    fraction of the post-warmup steps done.

    Args:
        step: global optimiser step (0-based; the lr used *for* that step).
        peak_lr: lr reached at the end of warmup (already scaled by global_batch / 256).
        warmup_steps: number of warmup steps (0 disables warmup).
        total_steps: total number of optimiser steps of the run.

    Returns:
        The learning rate for ``step``.
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def target_decay(step: int, *, tau_base: float, total_steps: int) -> float:
    """Cosine increase of the EMA decay: ``1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2``.

    Args:
        step: global step ``k`` (0-based).
        tau_base: decay at step 0 (0.99 or 0.996 in the paper).
        total_steps: ``K``, total optimiser steps; tau reaches 1 at ``k = K``.

    Returns:
        tau_k, in [tau_base, 1].
    """
    progress = min(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0
