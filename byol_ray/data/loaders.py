"""The loader dispatcher: two-view training and eval loaders over the FFCV, torch or device-memory backend."""

from __future__ import annotations

from pathlib import Path

import torch

from byol_ray.data.check import NO_FFCV_HINT, require_ffcv
from byol_ray.data.order import CropLaw
from byol_ray.dist import batch_share
from byol_ray.data.sources import Source, open_source
from byol_ray.preprocess import EVAL_CROP_RATIO

BACKENDS = ("ffcv", "torch")
TRAIN_BACKENDS = (*BACKENDS, "memory")  # memory: the whole data set on the device (byol_ray.data.memory)


def resolve_rank(distributed: bool, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): explicit values, else the torch.distributed group's, else (0, 1).

    Raises ValueError when the values contradict ``distributed`` or the initialised process group.
    """
    if not distributed:
        if (rank or 0) != 0 or (world_size or 1) != 1:
            raise ValueError(f"rank={rank}, world_size={world_size} given with distributed=False; "
                             "pass distributed=True to shard the data set")
        return 0, 1
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    g_rank, g_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if group else (0, 1)
    rank = g_rank if rank is None else rank
    world_size = g_size if world_size is None else world_size
    if group and (rank, world_size) != (g_rank, g_size):
        raise ValueError(f"rank={rank}, world_size={world_size} disagree with the initialised process group "
                         f"(rank {g_rank} of {g_size}); pass the group's values or leave them unset")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    return rank, world_size


class EpochLoader:
    """Batches of one rank for one epoch at a time; the same interface for every backend.

    Args:
        batches: the backend's batches (``__len__``, ``set_epoch``, ``__iter__``).
        backend: 'ffcv', 'torch' or 'memory'.
        batch_size: samples per batch on this rank.
        num_samples: size of the whole data set (all ranks).

    Attributes:
        epoch: the epoch the next iteration serves.
    """

    def __init__(self, batches, *, backend: str, batch_size: int, num_samples: int) -> None:
        self._batches, self.backend, self.batch_size, self.num_samples = batches, backend, batch_size, num_samples
        self.epoch = 0
        self.skip_batches = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._batches)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch the next iteration serves (its order is fixed by seed and epoch).

        Args:
            epoch: the epoch.
            skip_batches: start the next iteration at this batch of the epoch (a mid-epoch resume): the
                batches served are those an uninterrupted epoch serves from there, whatever the world size
                was when the earlier ones were served. Later iterations start at 0 again.
        """
        if skip_batches < 0:
            raise ValueError(f"skip_batches={skip_batches} must be >= 0")
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def __iter__(self):
        self._batches.set_epoch(self.epoch, self.skip_batches)
        self.epoch += 1  # iterating again without set_epoch moves on, as FFCV's loader does
        self.skip_batches = 0
        return iter(self._batches)


class TwoViewEpochLoader(EpochLoader):
    """Yields (view1, view2, labels): uint8 [B, 3, res, res] crops of the same images, int64 [B] labels.

    A batch's tensors are reused by the FFCV backend a few batches later: consume a batch (or
    clone it) before asking for the next few.
    """


class EvalLoader(EpochLoader):
    """Yields (images, labels): centre-cropped uint8 [B, 3, res, res] images in stored order."""


def _source(path, backend: str) -> Source:
    if isinstance(path, (str, Path)) and Path(path).is_file():
        raise ValueError(f"backend={backend!r} reads the source images; {path} is a file (a .beton?). Use "
                         "backend='ffcv' (data.loader=ffcv) for .beton files, or point at the source folder")
    return open_source(path)


def _check_common(backend: str, batch_size: int, resolution: int, num_workers: int, backends=BACKENDS) -> None:
    if backend not in backends:
        raise ValueError(f"backend={backend!r}: choose one of {backends} (config data.loader)")
    if batch_size < 1 or resolution < 1 or num_workers < 0:
        raise ValueError(f"batch_size={batch_size}, resolution={resolution}, num_workers={num_workers}: "
                         "batch size and resolution must be positive, num_workers >= 0")


def build_train_loader(path: str | Path | Source, *, backend: str = "ffcv", batch_size: int, resolution: int,
                       crop_scale: tuple[float, float] = (0.08, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       crop_law: str = "reference", flip_prob: float = 0.5, num_workers: int = 1, seed: int = 0,
                       distributed: bool = False, rank: int | None = None, world_size: int | None = None,
                       device: str | torch.device = "cpu", drop_last: bool = True,
                       order: str = "random", global_batch: int = 0) -> TwoViewEpochLoader:
    """Two random-resized, randomly flipped uint8 crops of each image, for one rank.

    Args:
        path: a .beton file (backend 'ffcv'), or a source for the other backends: 'demo', an image
            folder, a CIFAR folder, or a Source.
        backend: 'ffcv', 'torch' (the fallback where FFCV cannot be built) or 'memory' (the whole
            source decoded once onto ``device``; crops and flips batched there).
        batch_size: samples per batch on this rank.
        resolution: output side in pixels.
        crop_scale: range of the crop's area as a fraction of the image's.
        crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        crop_law: 'reference' (the paper's single draw, sides clamped to the image) or 'torchvision'
            (RandomResizedCrop's ten tries, centred fallback); see byol_ray.data.order.
        flip_prob: probability of a horizontal flip, per view.
        num_workers: FFCV threads or torch DataLoader processes (0: in this process); never -1.
        seed: order and crop seed (crops and flips drawn per (seed, epoch, sample, view) on the ffcv and
            torch backends, per (seed, epoch, rank) batch draws on 'memory'; a resumed run repeats an
            uninterrupted one); the same on every rank.
        distributed: shard the data set over ranks.
        rank: this rank; default: the torch.distributed group's, else 0.
        world_size: number of ranks; default: the group's, else 1.
        device: where the batches are delivered.
        drop_last: drop the last incomplete batch (keeps per-step batch statistics comparable).
        order: 'random' (a new seeded permutation each epoch) or 'sequential'.
        global_batch: the global batch of a training run (0: none). Each batch is then this rank's
            :func:`~byol_ray.dist.batch_share` of a global batch (``batch_size`` must be that share),
            the same global batches whatever the world size.

    Returns:
        A TwoViewEpochLoader.
    """
    _check_common(backend, batch_size, resolution, num_workers, TRAIN_BACKENDS)
    if order not in ("random", "sequential"):
        raise ValueError(f"order={order!r}: choose 'random' or 'sequential'")
    law = CropLaw(crop_law, crop_scale, crop_ratio)
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob={flip_prob} must lie in [0, 1]")
    rank, world_size = resolve_rank(distributed, rank, world_size)
    device = torch.device(device)
    # Equal shares per rank whatever drop_last says: ranks with different batch counts hang DDP.
    shard = dict(seed=seed, shuffle=order == "random", rank=rank, world_size=world_size, drop_last=True,
                 global_batch=global_batch)
    if global_batch and batch_share(global_batch, world_size, rank)[1] != batch_size:
        raise ValueError(f"batch_size={batch_size} is not rank {rank}'s share of global_batch={global_batch} over "
                         f"{world_size} ranks ({batch_share(global_batch, world_size, rank)[1]})")
    common = dict(batch_size=batch_size, resolution=resolution, law=law, flip_prob=flip_prob, seed=seed, shard=shard,
                  drop_last=drop_last, device=device)
    if backend == "ffcv":
        require_ffcv(NO_FFCV_HINT)
        from byol_ray.data import two_view

        batches, num_samples = two_view.train_batches(path, num_workers=num_workers, **common)
    elif backend == "memory":
        from byol_ray.data import memory

        source = _source(path, backend)
        batches, num_samples = memory.train_batches(source, **common), len(source)
    else:
        from byol_ray.data import torch_loader

        source = _source(path, backend)
        batches, num_samples = torch_loader.train_batches(source, num_workers=num_workers, **common), len(source)
    return TwoViewEpochLoader(batches, backend=backend, batch_size=batch_size, num_samples=num_samples)


def build_eval_loader(path: str | Path | Source, *, backend: str = "ffcv", batch_size: int, resolution: int,
                      num_workers: int = 1, device: str | torch.device = "cpu", distributed: bool = False,
                      rank: int | None = None, world_size: int | None = None,
                      center_crop_ratio: float = EVAL_CROP_RATIO, subset=None) -> EvalLoader:
    """Centre crops in stored order, every sample once (no drop_last), for one rank.

    Args:
        path: as for :func:`build_train_loader`.
        backend: 'ffcv' or 'torch'.
        batch_size: samples per batch on this rank.
        resolution: output side in pixels.
        num_workers: FFCV threads or torch DataLoader processes.
        device: where the batches are delivered.
        distributed: shard over ranks; shares differ by at most one sample (and so ranks may
            differ by one batch: gather results after the loop, not per batch).
        rank: as for :func:`build_train_loader`.
        world_size: as for :func:`build_train_loader`.
        center_crop_ratio: crop side / shorter image side (224/256; 1.0 keeps the whole of a
            square image, e.g. for 32-px CIFAR).
        subset: sample indices of a .beton to visit (backend 'ffcv'; a Source is subset by wrapping it).

    Returns:
        An EvalLoader.
    """
    _check_common(backend, batch_size, resolution, num_workers)
    if not 0 < center_crop_ratio <= 1:
        raise ValueError(f"center_crop_ratio={center_crop_ratio} must lie in (0, 1]")
    rank, world_size = resolve_rank(distributed, rank, world_size)
    device = torch.device(device)
    shard = dict(seed=0, shuffle=False, rank=rank, world_size=world_size, drop_last=False)
    common = dict(batch_size=batch_size, resolution=resolution, center_crop_ratio=center_crop_ratio,
                  num_workers=num_workers, shard=shard, device=device)
    if subset is not None and backend != "ffcv":
        raise ValueError("subset= selects samples of a .beton (backend 'ffcv'); subset a Source by wrapping it")
    if backend == "ffcv":
        require_ffcv(NO_FFCV_HINT)
        from byol_ray.data import two_view

        batches, num_samples = two_view.eval_batches(path, subset=subset, **common)
    else:
        from byol_ray.data import torch_loader

        source = _source(path, backend)
        batches, num_samples = torch_loader.eval_batches(source, **common), len(source)
    return EvalLoader(batches, backend=backend, batch_size=batch_size, num_samples=num_samples)


def run_loader(cfg, path: str, device: torch.device, *, rank: int = 0, world_size: int = 1):
    """The two-view loader of one worker of a run (``cfg``: its :class:`~byol_ray.config.Config`): its share of
    every global batch (the same global batches whatever the world size)."""
    d = cfg.data
    return build_train_loader(
        path, backend=d.loader, batch_size=batch_share(cfg.train.batch_size, world_size, rank)[1],
        global_batch=cfg.train.batch_size, resolution=d.resolution, crop_scale=d.crop_scale, crop_ratio=d.crop_ratio,
        crop_law=d.crop_law, flip_prob=d.flip_prob, num_workers=d.num_workers,
        seed=cfg.train.seed, distributed=world_size > 1, rank=rank, world_size=world_size, device=device,
    )
