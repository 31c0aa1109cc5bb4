"""Linear evaluation: a linear classifier on the frozen encoder, lr chosen on a held-out training slice."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from byol_ray.evaluation.data import (SELECTION_STREAM, LoaderSettings, Split, class_count, eval_loader,
                                     stratified_sample, train_loader)
from byol_ray.evaluation.features import extract_features
from byol_ray.preprocess import to_model_input

# The paper (docs/recipe.md, "Evaluation protocols") trains the classifier 80 epochs with random-resized-crop + flip,
# SGD + Nesterov momentum 0.9, no weight decay, lr 0.2 x B/256 with cosine decay, and sweeps lr over
# {0.4, 0.3, 0.2, 0.1, 0.05} x B/256 selected on a held-out slice of the training set. Deviations here:
# by default the classifier trains on precomputed centre-crop features (one encoder pass per image, practical
# on a CPU; usually a little below the augmented numbers), `augment=True` restores the paper's on-the-fly
# crops (the train loader's first view); and features are standardised with training statistics first
# (see Standardize).
PAPER_BASE_LRS = (0.4, 0.3, 0.2, 0.1, 0.05)  # x B/256


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Share of samples whose label is among the k highest logits (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def cosine_lr(step: int, total_steps: int, peak_lr: float) -> float:
    """lr · (1 + cos(π·t/T)) / 2, no warmup (the paper's linear-eval schedule)."""
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


class Standardize(nn.Module):
    """(y − mean) / std with fixed training-split statistics (MAE's linear probe uses a non-affine BatchNorm
    for the same reason): the classifier stays a linear function of the raw features, but SGD no longer
    depends on their scale, which varies by orders of magnitude between encoders (and before training)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone().clamp_min(1e-6))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std


def train_classifier(batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], *, in_dim: int,
                     num_classes: int, epochs: int, steps_per_epoch: int, lr: float, device: torch.device | str,
                     params: Iterable[nn.Parameter] = (), weight_decay: float = 0.0,
                     standardize: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """Train a zero-initialised linear layer on ``batches(epoch)`` with SGD + Nesterov and cosine lr.

    Args:
        batches: epoch → iterable of (inputs [B, in_dim], labels [B]); inputs may come from a trainable
            encoder whose parameters are passed in ``params`` (fine-tuning).
        in_dim, num_classes: the layer's shape.
        epochs, steps_per_epoch: the cosine schedule's length.
        lr: peak learning rate (already scaled by B/256).
        device: where the layer lives.
        params: extra parameters trained with the same optimiser (the encoder when fine-tuning).
        weight_decay: L2 on all parameters (0 for linear evaluation).
        standardize: (mean, std) of the training features, applied before the layer (:class:`Standardize`).

    Returns:
        The trained classifier (zero init: the convex problem's result depends only on the data order).
    """
    linear = nn.Linear(in_dim, num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    head = (nn.Sequential(Standardize(*standardize), linear) if standardize is not None else linear).to(device)
    optimizer = torch.optim.SGD([*head.parameters(), *params], lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        for inputs, labels in batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, lr)
            loss = F.cross_entropy(head(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head


def _feature_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    def batches(epoch: int):
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(labels)))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield features[idx], labels[idx]
    return batches, math.ceil(len(labels) / batch_size)


def _augmented_batches(encoder: nn.Module, split: Split, settings: LoaderSettings, seed: int):
    loader = train_loader(split, settings, seed=seed)
    if len(loader) == 0:
        raise ValueError(f"{split.description} has fewer images than one batch ({settings.batch_size})")

    def batches(epoch: int):
        loader.set_epoch(epoch)
        for view1, _view2, labels in loader:
            # Frozen encoder in inference mode (BN running statistics). The no_grad block must close before
            # the yield: grad mode is thread-global and would otherwise cover the classifier's step too.
            with torch.no_grad():
                features = encoder(to_model_input(view1)).float()
            yield features, labels
    return batches, len(loader)


def _fit(encoder, features, labels, split, settings, *, augment, lr, epochs, seed, num_classes) -> nn.Module:
    stats = (features.mean(dim=0), features.std(dim=0))  # of the centre-crop features of this training set
    if augment:
        batches, steps = _augmented_batches(encoder, split, settings, seed)
    else:
        batches, steps = _feature_batches(features, labels, settings.batch_size, seed)
    return train_classifier(batches, in_dim=features.shape[1], num_classes=num_classes, epochs=epochs,
                            steps_per_epoch=steps, lr=lr, device=settings.device, standardize=stats)


def linear_eval(encoder: nn.Module, train: Split, test: Split, settings: LoaderSettings, *, epochs: int = 80,
                base_lrs: tuple[float, ...] = PAPER_BASE_LRS, val_fraction: float = 0.1, seed: int = 0,
                augment: bool = False) -> dict[str, float | str]:
    """Linear evaluation of a frozen encoder.

    The lr sweep trains on the training split minus a seeded, stratified ``val_fraction`` and picks the
    base lr with the best held-out top-1; the classifier is then retrained on the whole training split
    with it and evaluated on the test split.

    Args:
        encoder: the frozen encoder (kept in eval mode, never updated).
        train, test: evaluation splits (:func:`byol_ray.evaluation.data.open_splits`).
        settings: resolution, batch size B, workers, device.
        epochs: classifier epochs (80 in the paper).
        base_lrs: the sweep, each scaled by B/256 (one value: no selection, no held-out slice).
        val_fraction: held-out share of the training split for the selection.
        seed: selection slice and data order.
        augment: the paper's random-resized-crop + flip during training instead of precomputed features.

    Returns:
        ``linear_top1``, ``linear_top5``, ``linear_base_lr``, ``linear_lr``, ``holdout_top1_lr<base_lr>`` per
        swept value, sizes and the mode.
    """
    encoder = encoder.to(settings.device).eval()  # its parameters are never given to the optimiser
    train_x, train_y = extract_features(encoder, eval_loader(train, settings), settings.device)
    test_x, test_y = extract_features(encoder, eval_loader(test, settings), settings.device)
    classes = class_count(train) or class_count(test) or int(max(train_y.max(), test_y.max())) + 1
    scale = settings.batch_size / 256
    train_x, train_y = train_x.to(settings.device), train_y.to(settings.device)
    result: dict[str, float | str] = {}
    best = base_lrs[0]
    if len(base_lrs) > 1:
        fit_pos, held_pos = _selection(train_y.cpu().numpy(), val_fraction, seed)
        fit_split = train.subset(fit_pos, "lr-selection fit") if augment else train
        scores = {}
        for base_lr in base_lrs:
            head = _fit(encoder, train_x[fit_pos], train_y[fit_pos], fit_split, settings, augment=augment,
                        lr=base_lr * scale, epochs=epochs, seed=seed, num_classes=classes)
            with torch.no_grad():
                scores[base_lr] = topk_accuracy(head(train_x[held_pos]), train_y[held_pos])[1]
            result[f"holdout_top1_lr{base_lr:g}"] = scores[base_lr]
        best = max(base_lrs, key=lambda lr: scores[lr])  # first of equals: the sweep's order breaks ties
    head = _fit(encoder, train_x, train_y, train, settings, augment=augment, lr=best * scale, epochs=epochs,
                seed=seed, num_classes=classes)
    with torch.no_grad():
        acc = topk_accuracy(head(test_x.to(settings.device)), test_y.to(settings.device))
    result.update(linear_top1=acc[1], linear_top5=acc[5], linear_base_lr=best, linear_lr=best * scale,
                  num_train=len(train_y), num_test=len(test_y), epochs=epochs,
                  mode="augment" if augment else "features")
    return result


def _selection(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) positions: a seeded, class-stratified slice of the training split (the paper holds
    out 10,000 ImageNet training images)."""
    held = stratified_sample(labels, val_fraction, np.random.default_rng([seed, SELECTION_STREAM]), keep_one=True)
    return np.setdiff1d(np.arange(len(labels)), held), held
