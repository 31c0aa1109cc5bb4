"""Which device a process computes on: the one rule for training, validation, the downstream jobs, embed and serve."""
from __future__ import annotations

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; asking for CUDA without one is an error that says the fix.

    Args:
        requested: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``train.device``, a job's ``--device``).
    """
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} asked for, but no CUDA device is visible; use cpu or auto "
                           "(train.device=auto, --device auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
