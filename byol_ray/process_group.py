"""Ray Train's torch process group, with its rendezvous store listening on one address, not on every interface.

Ray Train's ``TorchConfig`` has rank 0 host torch's ``TCPStore`` (the key-value store through which the
workers find each other), and torch binds that server to every interface (``::``): a run on a laptop or a
cloud VM exposed an unauthenticated store to the network for as long as it trained. Here rank 0 binds the
listening socket to its node address, the one Ray gives the other workers (127.0.0.1 on a local or
loopback cluster), and hands it to the store (``master_listen_fd``); every rank then joins with
``init_process_group(store=...)``. Everything else is Ray's rendezvous: the same backend choice, the same
``RANK``/``LOCAL_RANK``/... variables, the same timeout. gloo's own connections already bind the node
address.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend  # Ray 2.60 (pinned in the lock)

_store: dist.TCPStore | None = None  # rank 0's server, kept alive by the worker process that hosts it


def host_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """On rank 0: a TCPStore server on this node's address only; return where the other ranks find it."""
    global _store
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen()
    port = listener.getsockname()[1]
    _store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                           wait_for_workers=False, master_listen_fd=listener.detach())
    return address, port


def join(backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: float) -> None:
    """On every rank: join the process group through the store rank 0 hosts."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":  # as Ray does: fail on a collective that times out rather than hang
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    store = _store if world_rank == 0 else dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:
        world_size = len(worker_group)
        address, port = worker_group.execute_single(0, host_store, world_size=world_size,
                                                    timeout_s=backend_config.timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, join, backend=backend_config.backend, world_rank=rank,
                                                   world_size=world_size, address=address, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(world_size)])


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on rank 0's node address only (``backend`` is required)."""

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"BoundTorchConfig needs backend='gloo' or 'nccl', got {self.backend!r}")

    @property
    def backend_cls(self):
        return _BoundBackend
