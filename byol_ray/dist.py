"""Distributed facts through one door: rank, world size, main process; sensible without a process group."""
from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import nn


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the EMA and the registry read this one)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def gather(values: torch.Tensor) -> torch.Tensor:
    """Every rank's ``values`` stacked as [world_size, *values.shape] (just [1, ...] without a process group)."""
    if not is_initialized():
        return values.unsqueeze(0)
    out = [torch.empty_like(values) for _ in range(world_size())]
    torch_dist.all_gather(out, values.contiguous())
    return torch.stack(out)


def batch_share(global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """(offset, size) of ``rank``'s consecutive chunk of every global batch; sizes differ by at most one.

    Any world size works: 4096 over 12 workers gives four ranks 342 samples and eight 341.
    """
    if not 0 <= rank < world_size or global_batch < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}, global_batch={global_batch}: need 0 <= rank < "
                         f"world_size <= global_batch")
    base, extra = divmod(global_batch, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)
