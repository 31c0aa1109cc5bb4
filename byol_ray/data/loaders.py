"""The two-view training loader and the eval loader, over FFCV .beton files or (fallback) the source itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from byol_ray.data.prepare import require_ffcv, validate_beton
from byol_ray.data.sources import Source, open_source

BACKENDS = ("ffcv", "torch")
TRAIN_BACKENDS = (*BACKENDS, "memory")  # memory: the whole data set on the device (byol_ray.data.memory)
EVAL_CROP_RATIO = 224 / 256  # centre crop side / shorter image side (RECIPE.md, "Evaluation preprocessing")
_NO_FFCV = "use the torch loader instead (backend='torch', config data.loader=torch), which reads the source folder"


def shard_order(num_samples: int, epoch: int, *, seed: int, shuffle: bool, rank: int = 0,
                world_size: int = 1, drop_last: bool = True) -> np.ndarray:
    """The sample indices one rank visits in one epoch, identical for both backends.

    Every rank draws the same permutation (seeded by seed and epoch) and takes every
    world_size-th entry from its rank on, so ranks never share a sample. With drop_last the
    permutation is first cut to a multiple of world_size, giving every rank the same number of
    samples (and of batches: DDP needs that); without it ranks differ by at most one sample.

    Args:
        num_samples: data set size.
        epoch: the epoch (a different permutation each epoch).
        seed: the order seed; must be the same on every rank.
        shuffle: False keeps the stored order (evaluation).
        rank: this rank.
        world_size: number of ranks.
        drop_last: equal shares (training) instead of covering every sample (evaluation).

    Returns:
        int64 indices into the data set.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle else np.arange(num_samples)
    if drop_last:
        order = order[: num_samples - num_samples % world_size]
    return order[rank::world_size]


class _ShardOrder:
    """FFCV traversal order backed by :func:`shard_order` (duck-types ffcv's TraversalOrder).

    FFCV's own distributed orders pad with repeated samples (DistributedSampler drop_last=False)
    and read rank and world size from torch.distributed; this one needs neither.
    """

    def __init__(self, num_samples: int, **kwargs) -> None:
        self.num_samples, self.kwargs = num_samples, kwargs

    def sample_order(self, epoch: int) -> np.ndarray:
        return shard_order(self.num_samples, epoch, **self.kwargs).astype(np.uint64)


def _resolve_rank(distributed: bool, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): explicit values, else the torch.distributed group's, else (0, 1)."""
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


class _EpochLoader:
    """Batches of one rank for one epoch at a time; the same interface for both backends.

    Attributes:
        backend: 'ffcv' or 'torch'.
        batch_size: samples per batch on this rank.
        num_samples: size of the whole data set (all ranks).
        epoch: the epoch the next iteration serves.
    """

    def __init__(self, batches, *, backend: str, batch_size: int, num_samples: int) -> None:
        self._batches, self.backend, self.batch_size, self.num_samples = batches, backend, batch_size, num_samples
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._batches)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch the next iteration serves (its order is fixed by seed and epoch)."""
        self.epoch = int(epoch)

    def __iter__(self):
        self._batches.set_epoch(self.epoch)
        self.epoch += 1  # iterating again without set_epoch moves on, as FFCV's loader does
        return iter(self._batches)


class TwoViewLoader(_EpochLoader):
    """Yields (view1, view2, labels): uint8 [B, 3, res, res] crops of the same images, int64 [B] labels.

    A batch's tensors are reused by the FFCV backend a few batches later: consume a batch (or
    clone it) before asking for the next few.
    """


class EvalLoader(_EpochLoader):
    """Yields (images, labels): centre-cropped uint8 [B, 3, res, res] images in stored order."""


# ----------------------------------------------------------------------------------------- FFCV


class _FFCVBatches:
    def __init__(self, loader, num_views: int) -> None:
        self.loader, self.num_views = loader, num_views

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __iter__(self):
        threads = torch.get_num_threads()
        batches = iter(self.loader)
        torch.set_num_threads(threads)  # FFCV resets torch's thread count to num_workers on each epoch
        try:
            for batch in batches:
                # FFCV emits the file's fields first ('image', 'label'), then the extra view ('image2').
                yield (batch[0], batch[2], batch[1]) if self.num_views == 2 else batch
        finally:
            # An epoch left early (a break, an exception) would otherwise keep FFCV's producer
            # thread alive, polling forever: it is a running Thread, so never garbage-collected.
            batches.close()


def _ffcv_loader(path, *, batch_size: int, num_workers: int, drop_last: bool, pipelines: dict, shard: dict):
    require_ffcv(_NO_FFCV)
    import numba
    from ffcv.loader import Loader, OrderOption

    if not 1 <= num_workers <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"num_workers={num_workers}: the FFCV loader takes 1..{numba.config.NUMBA_NUM_THREADS} "
                         "threads (this host's cores); pass this worker's own CPU count")
    if isinstance(path, Source) or not Path(path).is_file():
        raise ValueError(f"backend='ffcv' reads a .beton file; {path} is not one. Convert it first with "
                         f"`byol-ray prepare {path} OUT.beton`, or {_NO_FFCV}")
    info = validate_beton(path)
    threads = torch.get_num_threads()
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                    pipelines=pipelines, drop_last=drop_last, seed=shard["seed"])
    torch.set_num_threads(threads)
    loader.traversal_order = _ShardOrder(info["num_samples"], **shard)
    loader.first_traversal_order = loader.next_traversal_order()  # what FFCV's __len__ counts
    return loader, info["num_samples"]


def _ffcv_image_ops(decoder, flip_prob: float, device: torch.device) -> list:
    # decoder -> jitted numpy ops -> ToTensor -> ToTorchImage -> ToDevice: a JIT op after a
    # non-JIT one makes FFCV's pipeline compiler loop forever (docs ENVIRONMENT.md).
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    # channels_last=False: contiguous NCHW like the torch backend; the batched colour ops run ~1.4x
    # faster on it on CPU than on FFCV's default channels-last view, for one cheap uint8 copy.
    ops = [decoder] + ([RandomHorizontalFlip(flip_prob)] if flip_prob > 0 else [])
    ops += [ToTensor(), ToTorchImage(channels_last=False)]
    return ops + ([ToDevice(device, non_blocking=True)] if device.type != "cpu" else [])


def _ffcv_label_ops(device: torch.device) -> list:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    return ops + ([ToDevice(device, non_blocking=True)] if device.type != "cpu" else [])


# ---------------------------------------------------------------------------------------- torch


def crop_params(height: int, width: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (and FFCV's get_random_crop) drawn from `rng`.

    Returns:
        (top, left, crop_height, crop_width).
    """
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback after 10 misses: the largest centred crop within the ratio range.
    in_ratio = width / height
    w, h = width, height
    if in_ratio < min(ratio):
        h = int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w = int(round(height * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


def _resized_crop(image: np.ndarray, box: tuple[int, int, int, int], resolution: int, flip: bool) -> torch.Tensor:
    from PIL import Image

    top, left, h, w = box
    # Bicubic as in the reference recipe; PIL widens the filter when shrinking (antialiased).
    out = np.array(Image.fromarray(image).resize((resolution, resolution), Image.BICUBIC,
                                                 box=(left, top, left + w, top + h)))
    if flip:
        out = np.ascontiguousarray(out[:, ::-1])
    return torch.from_numpy(out).permute(2, 0, 1)


class _SourceDataset(torch.utils.data.Dataset):
    """Items are (index, epoch) from _EpochSampler, so each crop is seeded by (seed, epoch, index)
    whatever the worker count, and persistent workers need no epoch broadcast."""

    def __init__(self, source: Source, *, resolution: int, seed: int, views: int, scale=None, ratio=None,
                 flip_prob: float = 0.0, crop_ratio: float = EVAL_CROP_RATIO) -> None:
        self.source, self.resolution, self.seed, self.views = source, resolution, seed, views
        self.scale, self.ratio, self.flip_prob, self.crop_ratio = scale, ratio, flip_prob, crop_ratio

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        index, epoch = item
        try:
            image = self.source.load(index)
        except Exception as exc:
            raise ValueError(f"cannot decode {self.source.describe(index)} ({exc}); remove it, or convert the "
                             "data set with `byol-ray prepare`, which skips unreadable files") from None
        label = int(self.source.labels[index])
        height, width = image.shape[:2]
        if self.views == 1:  # evaluation: FFCV's centre crop (ratio * shorter side), resized
            side = int(self.crop_ratio * min(height, width))
            box = ((height - side) // 2, (width - side) // 2, side, side)
            return _resized_crop(image, box, self.resolution, False), label
        rng = np.random.default_rng([self.seed, epoch, index])
        view1, view2 = (_resized_crop(image, crop_params(height, width, self.scale, self.ratio, rng),
                                      self.resolution, rng.random() < self.flip_prob) for _ in range(2))
        return view1, view2, label


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, num_samples: int, **kwargs) -> None:
        self.num_samples, self.kwargs, self.epoch = num_samples, kwargs, 0

    def __len__(self) -> int:
        kw = self.kwargs
        kept = self.num_samples - self.num_samples % kw["world_size"] if kw["drop_last"] else self.num_samples
        return len(range(kw["rank"], kept, kw["world_size"]))

    def __iter__(self):
        return ((int(i), self.epoch) for i in shard_order(self.num_samples, self.epoch, **self.kwargs))


def _single_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # PIL work per sample; torch threads would only oversubscribe


class _TorchBatches:
    def __init__(self, dataset: _SourceDataset, sampler: _EpochSampler, *, batch_size: int, num_workers: int,
                 drop_last: bool, device: torch.device) -> None:
        self.sampler, self.device = sampler, device
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
            persistent_workers=num_workers > 0, pin_memory=device.type == "cuda",
            worker_init_fn=_single_thread if num_workers > 0 else None)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __iter__(self):
        for batch in self.loader:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


def _torch_source(path, backend: str = "torch") -> Source:
    if isinstance(path, (str, Path)) and Path(path).is_file():
        raise ValueError(f"backend={backend!r} reads the source images; {path} is a file (a .beton?). Use "
                         "backend='ffcv' (data.loader=ffcv) for .beton files, or point at the source folder")
    return open_source(path)


# ---------------------------------------------------------------------------------------- build


def _check_common(backend: str, batch_size: int, resolution: int, num_workers: int, backends=BACKENDS) -> None:
    if backend not in backends:
        raise ValueError(f"backend={backend!r}: choose one of {backends} (config data.loader)")
    if batch_size < 1 or resolution < 1 or num_workers < 0:
        raise ValueError(f"batch_size={batch_size}, resolution={resolution}, num_workers={num_workers}: "
                         "batch size and resolution must be positive, num_workers >= 0")


def build_train_loader(path: str | Path | Source, *, backend: str = "ffcv", batch_size: int, resolution: int,
                       crop_scale: tuple[float, float] = (0.08, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       flip_prob: float = 0.5, num_workers: int = 1, seed: int = 0, distributed: bool = False,
                       rank: int | None = None, world_size: int | None = None, device: str | torch.device = "cpu",
                       drop_last: bool = True, order: str = "random") -> TwoViewLoader:
    """Two independently cropped and flipped views of every image, for one rank.

    Args:
        path: a .beton (backend 'ffcv'), or a source for backend 'torch': 'demo', an ImageFolder
            folder, a CIFAR python folder, or a Source.
        backend: 'ffcv', 'torch' (the fallback where FFCV cannot be built) or 'memory' (the whole
            source decoded once onto ``device``; crops and flips batched there).
        batch_size: samples per batch on this rank.
        resolution: output side in pixels.
        crop_scale: range of the crop's area as a fraction of the image's.
        crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
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

    Returns:
        A TwoViewLoader.
    """
    _check_common(backend, batch_size, resolution, num_workers, TRAIN_BACKENDS)
    if order not in ("random", "sequential"):
        raise ValueError(f"order={order!r}: choose 'random' or 'sequential'")
    if not (0 < crop_scale[0] <= crop_scale[1] <= 1 and 0 < crop_ratio[0] <= crop_ratio[1] and 0 <= flip_prob <= 1):
        raise ValueError(f"crop_scale={crop_scale} needs 0 < lo <= hi <= 1, crop_ratio={crop_ratio} 0 < lo <= hi, "
                         f"flip_prob={flip_prob} [0, 1]")
    rank, world_size = _resolve_rank(distributed, rank, world_size)
    device = torch.device(device)
    # Equal shares per rank whatever drop_last says: ranks with different batch counts hang DDP.
    shard = dict(seed=seed, shuffle=order == "random", rank=rank, world_size=world_size, drop_last=True)
    if backend == "ffcv":
        require_ffcv(_NO_FFCV)
        from byol_ray.data.two_view import TwoViewBatches, two_view_image_ops

        # One decode per image for both views; crops and flips seeded by (seed, epoch, index, view).
        image_ops, decoder = two_view_image_ops(resolution, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                                                flip_prob=flip_prob, seed=seed, device=device)
        pipelines = {"image": image_ops, "label": _ffcv_label_ops(device)}
        loader, num_samples = _ffcv_loader(path, batch_size=batch_size, num_workers=num_workers,
                                           drop_last=drop_last, pipelines=pipelines, shard=shard)
        batches = TwoViewBatches(_FFCVBatches(loader, num_views=1), decoder)
    elif backend == "memory":
        from byol_ray.data.memory import MemoryTwoViewBatches, load_to_device

        source = _torch_source(path, backend)
        images, labels = load_to_device(source, device)
        batches = MemoryTwoViewBatches(images, labels, batch_size=batch_size, resolution=resolution,
                                       scale=crop_scale, ratio=crop_ratio, flip_prob=flip_prob, seed=seed,
                                       shuffle=order == "random", rank=rank, world_size=world_size,
                                       drop_last=drop_last)
        num_samples = len(source)
    else:
        source = _torch_source(path)
        dataset = _SourceDataset(source, resolution=resolution, seed=seed, views=2, scale=tuple(crop_scale),
                                 ratio=tuple(crop_ratio), flip_prob=flip_prob)
        sampler = _EpochSampler(len(source), **shard)
        batches = _TorchBatches(dataset, sampler, batch_size=batch_size, num_workers=num_workers,
                                drop_last=drop_last, device=device)
        num_samples = len(source)
    return TwoViewLoader(batches, backend=backend, batch_size=batch_size, num_samples=num_samples)


def build_eval_loader(path: str | Path | Source, *, backend: str = "ffcv", batch_size: int, resolution: int,
                      num_workers: int = 1, device: str | torch.device = "cpu", distributed: bool = False,
                      rank: int | None = None, world_size: int | None = None,
                      center_crop_ratio: float = EVAL_CROP_RATIO) -> EvalLoader:
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

    Returns:
        An EvalLoader.
    """
    _check_common(backend, batch_size, resolution, num_workers)
    if not 0 < center_crop_ratio <= 1:
        raise ValueError(f"center_crop_ratio={center_crop_ratio} must lie in (0, 1]")
    rank, world_size = _resolve_rank(distributed, rank, world_size)
    device = torch.device(device)
    shard = dict(seed=0, shuffle=False, rank=rank, world_size=world_size, drop_last=False)
    if backend == "ffcv":
        require_ffcv(_NO_FFCV)
        from ffcv.fields.decoders import CenterCropRGBImageDecoder

        decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=center_crop_ratio)
        pipelines = {"image": _ffcv_image_ops(decoder, 0.0, device), "label": _ffcv_label_ops(device)}
        loader, num_samples = _ffcv_loader(path, batch_size=batch_size, num_workers=num_workers,
                                           drop_last=False, pipelines=pipelines, shard=shard)
        batches = _FFCVBatches(loader, num_views=1)
    else:
        source = _torch_source(path)
        dataset = _SourceDataset(source, resolution=resolution, seed=0, views=1, crop_ratio=center_crop_ratio)
        batches = _TorchBatches(dataset, _EpochSampler(len(source), **shard), batch_size=batch_size,
                                num_workers=num_workers, drop_last=False, device=device)
        num_samples = len(source)
    return EvalLoader(batches, backend=backend, batch_size=batch_size, num_samples=num_samples)
