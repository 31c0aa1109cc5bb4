"""Fine-tuning: the whole encoder plus a linear head, optionally on a 1% / 10% class-balanced label subset."""
from __future__ import annotations

import torch
from torch import nn

from byol_ray.evaluation.data import LoaderSettings, Split, class_count, eval_loader, label_subset, train_loader
from byol_ray.preprocess import to_model_input
from byol_ray.downstream.linear_eval import topk_accuracy, train_classifier


def _feature_dim(encoder: nn.Module, resolution: int, device) -> int:
    dim = getattr(encoder, "feature_dim", None)
    if dim:
        return int(dim)
    was_training = encoder.training
    with torch.no_grad():
        dim = encoder.eval()(torch.zeros(2, 3, resolution, resolution, device=device)).shape[1]
    encoder.train(was_training)
    return int(dim)


def finetune(encoder: nn.Module, train: Split, test: Split, settings: LoaderSettings, *, epochs: int = 30,
             base_lr: float = 0.05, weight_decay: float = 0.0, label_fraction: float | None = None,
             seed: int = 0) -> dict[str, float | str]:
    """Fine-tune ``encoder`` (updated in place) with a linear head and evaluate on ``test``.

    As in the paper's semi-supervised protocol (BYOL §4, appendix C): SGD + Nesterov momentum 0.9,
    cosine lr decay, random-resized-crop + flip training views, centre-crop evaluation; the paper
    sweeps lr and weight decay, here they are arguments.

    Args:
        encoder: a trainable encoder (``load_encoder`` returns one); trained in BN training mode.
        train, test: evaluation splits.
        settings: resolution, batch size B (capped at the subset size), workers, device.
        epochs: training epochs.
        base_lr: peak lr per 256 images (scaled by B/256).
        weight_decay: L2 on encoder and head.
        label_fraction: train on a seeded class-balanced share of the labels (0.01, 0.1); None = all.
        seed: subset and data order.

    Returns:
        ``finetune_top1``, ``finetune_top5``, ``finetune_label_fraction``, ``finetune_lr``, sizes.
    """
    if label_fraction is not None and not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction={label_fraction} must lie in (0, 1]")
    if label_fraction is not None and label_fraction < 1:
        train = train.subset(label_subset(train.source.labels, label_fraction, seed), f"{label_fraction:g} of labels")
    num_train = len(train.data) if not isinstance(train.data, str) else None
    batch_size = min(settings.batch_size, num_train or settings.batch_size)
    if batch_size < 2:
        raise ValueError(f"{train.description} holds {num_train} image(s); BatchNorm training needs at least 2")
    classes = class_count(train) or class_count(test)
    device = torch.device(settings.device)
    encoder = encoder.to(device).requires_grad_(True)
    loader = train_loader(train, settings, seed=seed, batch_size=batch_size)
    if classes is None:  # .beton files without a manifest: read the classes off one pass of labels
        classes = int(max(int(labels.max()) for _, _, labels in loader)) + 1
    in_dim = _feature_dim(encoder, settings.resolution, device)

    def batches(epoch: int):
        encoder.train()
        loader.set_epoch(epoch)
        for view1, _view2, labels in loader:
            yield encoder(to_model_input(view1)).float(), labels

    lr = base_lr * batch_size / 256
    head = train_classifier(batches, in_dim=in_dim, num_classes=classes, epochs=epochs, steps_per_epoch=len(loader),
                            lr=lr, device=device, params=list(encoder.parameters()), weight_decay=weight_decay)
    encoder.eval()
    logits, labels = [], []
    with torch.no_grad():
        for images, target in eval_loader(test, settings):
            logits.append(head(encoder(to_model_input(images)).float()))
            labels.append(target.clone())  # FFCV reuses a batch's buffers a few batches later
    acc = topk_accuracy(torch.cat(logits), torch.cat(labels))
    return {"finetune_top1": acc[1], "finetune_top5": acc[5], "finetune_label_fraction": label_fraction or 1.0,
            "finetune_lr": lr, "finetune_base_lr": base_lr, "num_train": num_train or len(loader) * batch_size,
            "num_test": len(torch.cat(labels)), "epochs": epochs}
