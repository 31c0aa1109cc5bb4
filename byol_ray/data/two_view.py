"""The FFCV backend: a two-view decoder (one decode per image, seeded crops and flips) and the FFCV Loader glue.

FFCV's stock route to two views (two pipelines on one stored field, each with
``RandomResizedCropRGBImageDecoder`` + ``RandomHorizontalFlip``) decodes every JPEG twice and draws
its crops and flips from numba's unseeded per-thread generator, so a resumed or repeated run sees
different crops. :class:`TwoViewDecoder` decodes a sample once into a scratch buffer and cuts both
views from it; each view's crop and flip come from a counter-based generator keyed by
(seed, epoch, sample index, view), so they are the same whichever thread decodes the sample, however
many threads there are, and whether the run was interrupted or not. The crop law is
:func:`byol_ray.data.order.crop_box`, compiled by numba.

Resizing is FFCV's ``resize_crop`` (OpenCV ``INTER_AREA``), as in FFCV's own decoders; the torch
backend resizes with PIL bicubic, so the two backends cut crops by the same law but not from
the same random draws and not to the same pixels.

Batch layout: the decoder returns the batch *view-major*, ``uint8 [2, B, 3, H, W]``, so ``out[0]``
and ``out[1]`` are contiguous NCHW tensors with no further copy. FFCV's accounting (State.shape,
the per-sample allocation) sees the per-sample shape ``(2, 3, H, W)``; only :class:`ViewsToDevice`
(not FFCV's ``ToDevice``/``ToTorchImage``, which assume a leading batch axis) may follow ``ToTensor``.

This module imports FFCV and numba at import time: import it only where FFCV is required (the
loader dispatcher does, after ``require_ffcv``).
"""

from __future__ import annotations

import threading

from dataclasses import replace
from pathlib import Path

import numba
import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import njit

from byol_ray.data.check import NO_FFCV_HINT, validate_beton
from byol_ray.data.order import CROP_DRAWS, CropLaw, crop_box, shard_order

# ------------------------------------------------------------------------------ counter-based draws

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0  # 2 ** -53
_U64 = (1 << 64) - 1


@njit(nogil=True)
def _mix(x):
    """SplitMix64's finaliser: a bijection of uint64 that scrambles every input bit into every output bit."""
    z = np.uint64(x) + _GOLDEN  # every value here is uint64: numba would mix int64 in as signed (or float)
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(nogil=True)
def _view_key(seed_key, epoch, index, view):
    """The generator state of one view of one sample in one epoch (all arguments uint64)."""
    return _mix(_mix(_mix(np.uint64(seed_key) ^ np.uint64(epoch)) ^ np.uint64(index)) ^ np.uint64(view))


@njit(nogil=True)
def _uniform(state):
    """(u in [0, 1) with 53 random bits, next state): SplitMix64 stepping."""
    state = np.uint64(state) + _GOLDEN
    return np.float64(_mix(state) >> _S11) * _TWO_M53, state


_crop_box = njit(nogil=True)(crop_box)  # the one crop law, compiled


@njit(nogil=True)
def _draw(key, epoch, index, view, out):
    """Fills ``out`` with one view's uniforms (the crop's, then the flip's), keyed as :func:`_view_key`."""
    state = _view_key(key, epoch, index, view)
    for k in range(len(out)):
        out[k], state = _uniform(state)


@njit(nogil=True)
def _view_params(key, epoch, index, view, height, width, law, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi,
                 flip_prob):
    u = np.empty(CROP_DRAWS + 1)
    _draw(key, epoch, index, view, u)
    top, left, h, w = _crop_box(u, height, width, law, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi)
    return top, left, h, w, u[CROP_DRAWS] < flip_prob


def seed_key(seed: int) -> np.uint64:
    """The uint64 key of a crop seed (any Python int; negative seeds wrap)."""
    return np.uint64(_mix(np.uint64(int(seed) & _U64)))


def view_uniforms(seed: int, epoch: int, index: int, view: int) -> np.ndarray:
    """The uniforms :class:`TwoViewDecoder` draws for one view of one stored sample.

    Args:
        seed: the loader's seed.
        epoch: the epoch.
        index: the sample's index in the .beton file.
        view: 0 or 1.

    Returns:
        float64 [CROP_DRAWS + 1]: the crop's uniforms (as byol_ray.data.order lays them out), then the flip's.
    """
    u = np.empty(CROP_DRAWS + 1)
    _draw(seed_key(seed), np.uint64(epoch), np.uint64(index), np.uint64(view), u)
    return u


def view_params(seed: int, epoch: int, index: int, view: int, height: int, width: int, scale=(0.08, 1.0),
                ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5, law: str = "reference") -> tuple[int, int, int, int, bool]:
    """The crop box and flip that :class:`TwoViewDecoder` uses for one view of one stored sample.

    Args:
        seed: the loader's seed.
        epoch: the epoch.
        index: the sample's index in the .beton file.
        view: 0 or 1.
        height: stored image height.
        width: stored image width.
        scale: area fraction range.
        ratio: aspect (width / height) range.
        flip_prob: probability of a horizontal flip.
        law: the crop law, 'reference' or 'torchvision' (byol_ray.data.order).

    Returns:
        (top, left, crop_height, crop_width, flipped).
    """
    args = CropLaw(law, scale, ratio).args()
    top, left, h, w, flip = _view_params(seed_key(seed), np.uint64(epoch), np.uint64(index), np.uint64(view),
                                         np.int64(height), np.int64(width), *args, float(flip_prob))
    return int(top), int(left), int(h), int(w), bool(flip)


# ------------------------------------------------------------------------------------ FFCV ops

@njit(nogil=True)
def _to_chw(src, dst, flip):
    """dst[c, y, x] = src[y, x', c] with x' = W-1-x when flipped: HWC scratch -> one CHW view."""
    h, w = src.shape[0], src.shape[1]
    for c in range(3):
        for y in range(h):
            if flip:
                for x in range(w):
                    dst[c, y, x] = src[y, w - 1 - x, c]
            else:
                for x in range(w):
                    dst[c, y, x] = src[y, x, c]


class TwoViewDecoder(ResizedCropRGBImageDecoder):
    """Decodes each stored RGB image once and emits two seeded random-resized, randomly flipped crops.

    Use as the decoder of the image pipeline, followed by ``ToTensor()`` and optionally
    :class:`ViewsToDevice`; the pipeline's output is ``uint8 [2, B, 3, H, W]`` (view-major, see
    the module docstring). Call :meth:`set_epoch` before each epoch's iteration starts.

    Args:
        output_size: (height, width) of each view.
        law: the crop law and its scale and ratio ranges.
        flip_prob: probability of a horizontal flip, per view.
        seed: crop seed; with the epoch, the sample index and the view it fixes every draw.
    """

    def __init__(self, output_size, law: CropLaw = CropLaw(), flip_prob: float = 0.5, seed: int = 0) -> None:
        super().__init__(tuple(int(s) for s in output_size))
        self.law, self.flip_prob, self.seed = law, float(flip_prob), int(seed)
        # numba freezes arrays captured by a compiled closure into constants, so the compiled code
        # reads the epoch through this array's address instead (see generate_code).
        self.epoch_box = np.zeros(1, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return int(self.epoch_box[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose crops the next decoded batches get (read by the compiled code per batch)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self.epoch_box[0] = epoch

    @property
    def get_crop_generator(self):
        # Abstract in FFCV's base class, read only by the base generate_code, which ours replaces.
        return _crop_box

    def declare_state_and_memory(self, previous_state: State):
        self.max_width = np.uint64(self.metadata["width"].max())
        self.max_height = np.uint64(self.metadata["height"].max())
        out_h, out_w = self.output_size
        per_sample = (2, 3, out_h, out_w)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=per_sample, dtype=u8),
                (AllocationQuery(per_sample, u8),  # the two views (laid out view-major)
                 AllocationQuery((self.max_height * self.max_width * np.uint64(3),), u8),  # decoded JPEG
                 AllocationQuery((out_h, out_w, 3), u8)))  # one resized HWC crop

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # Fresh dispatchers per loader, as FFCV's decoders make: their signatures hold numba's uint8[::1]
        # type, which each FFCV Loader construction mutates in place (OSCacheManager.state_type), so a
        # dispatcher compiled for an earlier loader can no longer find its own overloads (KeyError).
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        to_chw, crop, draw = _to_chw, _crop_box, _draw  # float64/3-D arrays and scalars only: shared safely
        read_raw = ctypes_memcopy
        out_h, out_w = self.output_size
        law, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi = self.law.args()
        flip_prob, draws = self.flip_prob, CROP_DRAWS
        key = seed_key(self.seed)
        epoch_address = np.uint64(self.epoch_box.ctypes.data)  # the op keeps the array alive
        eight = np.uint64(8)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, scratch = my_storage
            count = len(batch_indices)
            epoch_now = np.empty(1, dtype=np.int64)
            read_raw(epoch_address, epoch_now.ctypes.data, eight)  # the epoch as of this batch
            epoch = np.uint64(epoch_now[0])
            views = destination.reshape(2, count, 3, out_h, out_w)  # the same memory, view-major
            for dst_ix in my_range(count):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.int64(field["height"])
                width = np.int64(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                u = np.empty(draws + 1)  # the crop's uniforms, then the flip's
                for view in range(2):
                    draw(key, epoch, np.uint64(source_ix), np.uint64(view), u)
                    top, left, h, w = crop(u, height, width, law, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi)
                    resize_crop_c(image, top, top + h, left, left + w, scratch[dst_ix])
                    to_chw(scratch[dst_ix], views[view, dst_ix], u[draws] < flip_prob)
            return views

        decode.is_parallel = True
        return decode


class ViewsToDevice(Operation):
    """FFCV's ToDevice for a view-major [2, B, ...] tensor (ToDevice assumes the batch axis leads).

    Runs inside FFCV's producer thread, so its stream and buffer-reuse bookkeeping cover the copy.
    """

    def __init__(self, device, non_blocking: bool = True) -> None:
        super().__init__()
        self.device, self.non_blocking = torch.device(device), non_blocking

    def generate_code(self):
        non_blocking = self.non_blocking

        def to_device(inp, dst):
            out = dst.view(-1)[:inp.numel()].view(inp.shape)  # [B, 2, ...] buffer, same element count
            out.copy_(inp, non_blocking=non_blocking)
            return out

        return to_device

    def declare_state_and_memory(self, previous_state: State):
        return (replace(previous_state, device=self.device),
                AllocationQuery(previous_state.shape, dtype=previous_state.dtype, device=self.device))


def two_view_image_ops(resolution: int, *, law: CropLaw, flip_prob: float, seed: int,
                       device: torch.device) -> tuple[list, TwoViewDecoder]:
    """The image pipeline (decoder -> ToTensor -> optional ViewsToDevice) and its decoder."""
    from ffcv.transforms import ToTensor

    decoder = TwoViewDecoder((resolution, resolution), law, flip_prob, seed)
    ops = [decoder, ToTensor()]  # the decoder is the only JIT op: nothing non-JIT precedes a JIT op
    if device.type != "cpu":
        ops.append(ViewsToDevice(device, non_blocking=True))
    return ops, decoder


class TwoViewBatches:
    """(view1, view2, labels) from a single-output FFCV loader whose image pipeline is two_view_image_ops.

    Wraps the loader's batch iterator (:class:`FFCVBatches`); keeps the decoder's epoch equal to the
    epoch FFCV is about to serve.
    """

    def __init__(self, batches, decoder: TwoViewDecoder) -> None:
        self.batches, self.decoder = batches, decoder

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.batches.set_epoch(epoch, skip_batches)
        self.decoder.set_epoch(epoch)

    def __iter__(self):
        # Set before FFCV starts the epoch's producer thread (in iter(loader)), which reads it per batch.
        self.decoder.set_epoch(self.batches.loader.next_epoch)
        inner = iter(self.batches)
        try:
            for views, labels in inner:
                yield views[0], views[1], labels
        finally:
            inner.close()  # stops FFCV's producer thread when an epoch is left early


# ------------------------------------------------------------------------------ FFCV Loader glue


class ShardOrder:
    """FFCV traversal order backed by :func:`byol_ray.data.order.shard_order` (duck-types ffcv's TraversalOrder).

    FFCV's own distributed orders pad with repeated samples (DistributedSampler drop_last=False)
    and read rank and world size from torch.distributed; this one needs neither.
    """

    def __init__(self, num_samples: int, subset: np.ndarray | None = None, **shard) -> None:
        self.num_samples, self.shard = num_samples, shard
        self.subset = None if subset is None else np.asarray(subset, dtype=np.int64)  # visit only these samples
        self.skip = 0  # samples of this rank's share to leave out at the start (a mid-epoch resume)

    def sample_order(self, epoch: int) -> np.ndarray:
        if self.subset is not None:
            return self.subset[shard_order(len(self.subset), epoch, **self.shard)][self.skip:].astype(np.uint64)
        return shard_order(self.num_samples, epoch, **self.shard)[self.skip:].astype(np.uint64)


class FFCVBatches:
    """An FFCV Loader's batches, one epoch per iteration, with torch's thread count kept and early exits clean."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.loader.next_epoch = epoch
        self.loader.traversal_order.skip = skip_batches * self.loader.batch_size

    def __iter__(self):
        threads = torch.get_num_threads()
        batches = iter(self.loader)
        torch.set_num_threads(threads)  # FFCV resets torch's thread count to num_workers on each epoch
        try:
            yield from batches
        finally:
            # An epoch left early (a break, an exception) would otherwise keep FFCV's producer
            # thread alive, polling forever: it is a running Thread, so never garbage-collected.
            batches.close()
            # close() only asks the thread to stop (it polls every 0.5 s); one still inside numba's TBB pool
            # when the process exits aborts it ("terminate called without an active exception").
            if isinstance(batches, threading.Thread) and batches is not threading.current_thread():
                batches.join(timeout=60)


def ffcv_loader(path, *, batch_size: int, num_workers: int, drop_last: bool, pipelines: dict, shard: dict,
                subset: np.ndarray | None = None):
    """An FFCV Loader over a checked .beton, visiting :func:`shard_order`'s samples.

    Args:
        path: the .beton file.
        batch_size: samples per batch.
        num_workers: FFCV threads, 1..this host's cores.
        drop_last: drop the last incomplete batch.
        pipelines: FFCV pipelines by output name.
        shard: keyword arguments of :func:`shard_order` (seed, shuffle, rank, world_size, drop_last).
        subset: visit only these sample indices (None: all).

    Returns:
        (the Loader, the number of samples in the file).
    """
    from ffcv.loader import Loader, OrderOption

    if not 1 <= num_workers <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"num_workers={num_workers}: the FFCV loader takes 1..{numba.config.NUMBA_NUM_THREADS} "
                         "threads (this host's cores); pass this worker's own CPU count")
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        raise ValueError(f"backend='ffcv' reads a .beton file; {path} is not one. Convert it first with "
                         f"`byol-ray prepare {path} OUT.beton`, or {NO_FFCV_HINT}")
    info = validate_beton(path)
    threads = torch.get_num_threads()
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL,
                    pipelines=pipelines, drop_last=drop_last, seed=shard["seed"])
    torch.set_num_threads(threads)
    if subset is not None and len(subset) and not 0 <= int(np.min(subset)) <= int(np.max(subset)) < info["num_samples"]:
        raise ValueError(f"subset indices must lie in [0, {info['num_samples']}) for {path}")
    loader.traversal_order = ShardOrder(info["num_samples"], subset=subset, **shard)
    loader.first_traversal_order = loader.next_traversal_order()  # what FFCV's __len__ counts
    return loader, info["num_samples"]


def ffcv_image_ops(decoder, device: torch.device) -> list:
    """An image pipeline: ``decoder`` -> ToTensor -> ToTorchImage (contiguous NCHW) -> ToDevice off the CPU."""
    # decoder -> jitted numpy ops -> ToTensor -> ToTorchImage -> ToDevice: a JIT op after a
    # non-JIT one makes FFCV's pipeline compiler loop forever (docs/design.md, "Facts about the tools").
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    # channels_last=False: contiguous NCHW like the torch backend; the batched colour ops run ~1.4x
    # faster on it on CPU than on FFCV's default channels-last view, for one cheap uint8 copy.
    ops = [decoder, ToTensor(), ToTorchImage(channels_last=False)]
    return ops + ([ToDevice(device, non_blocking=True)] if device.type != "cpu" else [])


def ffcv_label_ops(device: torch.device) -> list:
    """The label pipeline: int64 [B] on ``device``."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    return ops + ([ToDevice(device, non_blocking=True)] if device.type != "cpu" else [])


def train_batches(path, *, batch_size: int, resolution: int, law: CropLaw, flip_prob: float, num_workers: int,
                  seed: int, shard: dict, drop_last: bool, device: torch.device) -> tuple[TwoViewBatches, int]:
    """Two-view batches of a .beton: one decode per image, crops and flips seeded by (seed, epoch, index, view).

    Returns:
        (the batches, the number of samples in the file).
    """
    image_ops, decoder = two_view_image_ops(resolution, law=law, flip_prob=flip_prob, seed=seed, device=device)
    pipelines = {"image": image_ops, "label": ffcv_label_ops(device)}
    loader, num_samples = ffcv_loader(path, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                                      pipelines=pipelines, shard=shard)
    return TwoViewBatches(FFCVBatches(loader), decoder), num_samples


def eval_batches(path, *, batch_size: int, resolution: int, center_crop_ratio: float, num_workers: int,
                 shard: dict, device: torch.device, subset: np.ndarray | None = None) -> tuple[FFCVBatches, int]:
    """(images, labels) batches of a .beton (or of the ``subset`` of its samples), centre-cropped (ratio x
    shorter side) and resized.

    Returns:
        (the batches, the number of samples visited: the file's, or the subset's).
    """
    from ffcv.fields.decoders import CenterCropRGBImageDecoder

    decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=center_crop_ratio)
    pipelines = {"image": ffcv_image_ops(decoder, device), "label": ffcv_label_ops(device)}
    loader, num_samples = ffcv_loader(path, batch_size=batch_size, num_workers=num_workers, drop_last=False,
                                      pipelines=pipelines, shard=shard, subset=subset)
    return FFCVBatches(loader), num_samples if subset is None else len(subset)
