"""Frozen features of an eval split: encoder → [N, D] (the model input contract is byol_ray.preprocess)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from byol_ray.preprocess import to_model_input


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of a whole eval split (encoder in eval mode: BN running statistics, no grad).

    Args:
        encoder: images → [B, D] representations y (the online encoder).
        loader: yields (uint8 images [B, 3, R, R], int64 labels [B]), centre-cropped.
        device: where to run the encoder.

    Returns:
        (features float32 [N, D] on CPU, labels int64 [N] on CPU).
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for images, target in loader:
            feats.append(encoder(to_model_input(images.to(device, non_blocking=True))).float().cpu())
            # a copy: FFCV reuses a batch's buffers a few batches later (.cpu()/.long() can be no-ops)
            labels.append(target.to("cpu", torch.int64, copy=True))
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("the eval loader yielded no batches; is the split empty or the batch larger than it?")
    return torch.cat(feats), torch.cat(labels)


def wants_bf16(precision: str, device: torch.device) -> bool:
    """``embed``/``serve``'s ``--precision``: 'bf16', 'fp32', or 'auto' (bf16 on CUDA, fp32 elsewhere)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, *, bf16: bool = False) -> torch.Tensor:
    """uint8 [B, 3, R, R] eval crops on the encoder's device -> float32 [B, D] features on the CPU (bf16 autocast
    when asked). The per-batch step of ``embed``'s encoder actors and ``serve``'s replicas."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        return encoder(to_model_input(images)).float().cpu()
