"""FFCV two-view decoder: each image decoded once, two seeded random-resized crops (and flips) cut from it.

FFCV's stock route to two views (two pipelines on one stored field, each with
``RandomResizedCropRGBImageDecoder`` + ``RandomHorizontalFlip``) decodes every JPEG twice and draws
its crops and flips from numba's unseeded per-thread generator, so a resumed or repeated run sees
different crops. :class:`TwoViewDecoder` decodes a sample once into a scratch buffer and cuts both
views from it; each view's crop and flip come from a counter-based generator keyed by
(seed, epoch, sample index, view), so they are the same whichever thread decodes the sample, however
many threads there are, and whether the run was interrupted or not.

Resizing is FFCV's ``resize_crop`` (OpenCV ``INTER_AREA``), as in FFCV's own decoders; the torch
backend resizes with PIL bicubic, so the two backends cut crops by the same algorithm but not from
the same random draws and not to the same pixels.

Batch layout: the decoder returns the batch *view-major*, ``uint8 [2, B, 3, H, W]``, so ``out[0]``
and ``out[1]`` are contiguous NCHW tensors with no further copy. FFCV's accounting (State.shape,
the per-sample allocation) sees the per-sample shape ``(2, 3, H, W)``; only :class:`ViewsToDevice`
(not FFCV's ``ToDevice``/``ToTorchImage``, which assume a leading batch axis) may follow ``ToTensor``.

This module imports FFCV and numba at import time: import it only where FFCV is required (the FFCV
branch of ``build_train_loader`` does, after ``require_ffcv``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import njit

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


@njit(nogil=True)
def _crop_and_flip(height, width, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi, flip_prob, state):
    """torchvision's RandomResizedCrop.get_params (as ``loaders.crop_params``) then a flip draw.

    Ten tries of area ~ U[scale_lo, scale_hi] * image area and log(aspect) ~ U[log_r_lo, log_r_hi]; the
    first crop that fits is placed uniformly; after ten misses, the largest centred crop whose aspect
    lies within [r_lo, r_hi]. Returns (top, left, crop_height, crop_width, flip).
    """
    height, width, state = np.int64(height), np.int64(width), np.uint64(state)
    area = np.float64(height) * np.float64(width)
    for _ in range(10):
        u, state = _uniform(state)
        target_area = area * (scale_lo + (scale_hi - scale_lo) * u)
        u, state = _uniform(state)
        aspect = np.exp(log_r_lo + (log_r_hi - log_r_lo) * u)
        w = np.int64(round(np.sqrt(target_area * aspect)))
        h = np.int64(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            u, state = _uniform(state)
            top = min(np.int64(u * (height - h + 1)), height - h)
            u, state = _uniform(state)
            left = min(np.int64(u * (width - w + 1)), width - w)
            u, state = _uniform(state)
            return top, left, h, w, u < flip_prob
    in_ratio = np.float64(width) / np.float64(height)
    w, h = width, height
    if in_ratio < r_lo:
        h = np.int64(round(width / r_lo))
    elif in_ratio > r_hi:
        w = np.int64(round(height * r_hi))
    u, state = _uniform(state)
    return (height - h) // 2, (width - w) // 2, h, w, u < flip_prob


@njit(nogil=True)
def _view_params(key, epoch, index, view, height, width, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi,
                 flip_prob):
    return _crop_and_flip(height, width, scale_lo, scale_hi, log_r_lo, log_r_hi, r_lo, r_hi, flip_prob,
                          _view_key(key, epoch, index, view))


def seed_key(seed: int) -> np.uint64:
    """The uint64 key of a crop seed (any Python int; negative seeds wrap)."""
    return np.uint64(_mix(np.uint64(int(seed) & _U64)))


def view_params(seed: int, epoch: int, index: int, view: int, height: int, width: int,
                scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5) -> tuple[int, int, int, int, bool]:
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

    Returns:
        (top, left, crop_height, crop_width, flipped).
    """
    top, left, h, w, flip = _view_params(seed_key(seed), np.uint64(epoch), np.uint64(index), np.uint64(view),
                                         height, width, float(scale[0]), float(scale[1]), float(np.log(ratio[0])),
                                         float(np.log(ratio[1])), float(ratio[0]), float(ratio[1]), float(flip_prob))
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
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_prob: probability of a horizontal flip, per view.
        seed: crop seed; with the epoch, the sample index and the view it fixes every draw.
    """

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5,
                 seed: int = 0) -> None:
        super().__init__(tuple(int(s) for s in output_size))
        self.scale, self.ratio, self.flip_prob, self.seed = tuple(scale), tuple(ratio), float(flip_prob), int(seed)
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
        return _crop_and_flip

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
        to_chw, crop_and_flip = _to_chw, _crop_and_flip  # 3-D arrays and scalars only: shared safely
        view_key, read_raw = _view_key, ctypes_memcopy
        out_h, out_w = self.output_size
        scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
        r_lo, r_hi = float(self.ratio[0]), float(self.ratio[1])
        log_r_lo, log_r_hi = float(np.log(r_lo)), float(np.log(r_hi))
        flip_prob = self.flip_prob
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
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                for view in range(2):
                    state = view_key(key, epoch, np.uint64(source_ix), np.uint64(view))
                    top, left, h, w, flip = crop_and_flip(height, width, scale_lo, scale_hi, log_r_lo, log_r_hi,
                                                          r_lo, r_hi, flip_prob, state)
                    resize_crop_c(image, top, top + h, left, left + w, scratch[dst_ix])
                    to_chw(scratch[dst_ix], views[view, dst_ix], flip)
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


def two_view_image_ops(resolution: int, *, scale, ratio, flip_prob: float, seed: int,
                       device: torch.device) -> tuple[list, TwoViewDecoder]:
    """The image pipeline (decoder -> ToTensor -> optional ViewsToDevice) and its decoder."""
    from ffcv.transforms import ToTensor

    decoder = TwoViewDecoder((resolution, resolution), scale, ratio, flip_prob, seed)
    ops = [decoder, ToTensor()]  # the decoder is the only JIT op: nothing non-JIT precedes a JIT op
    if device.type != "cpu":
        ops.append(ViewsToDevice(device, non_blocking=True))
    return ops, decoder


class TwoViewBatches:
    """(view1, view2, labels) from a single-output FFCV loader whose image pipeline is two_view_image_ops.

    Wraps the loader's batch iterator (``loaders._FFCVBatches`` with one view); keeps the decoder's
    epoch equal to the epoch FFCV is about to serve.
    """

    def __init__(self, batches, decoder: TwoViewDecoder) -> None:
        self.batches, self.decoder = batches, decoder

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)
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
