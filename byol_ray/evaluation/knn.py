"""Weighted kNN classification on frozen features (InstDisc / solo-learn: cosine, k=200, T=0.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                num_classes: int, k: int = 200, temperature: float = 0.1, chunk_size: int = 1024) -> torch.Tensor:
    """Class scores of each test sample from its k most cosine-similar training samples.

    Each neighbour votes for its class with weight exp(sim / T) (Wu et al. 2018, InstDisc; solo-learn's
    ``WeightedKNNClassifier``); the predicted class has the largest summed weight.

    Args:
        train_features: [N, D] memory bank.
        train_labels: int64 [N].
        test_features: [M, D].
        num_classes: C.
        k: neighbours (capped at N).
        temperature: T.
        chunk_size: test samples per similarity block (bounds memory at chunk_size x N).

    Returns:
        float [M, C] summed vote weights.
    """
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start:start + chunk_size].float(), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)  # [m, k] cosine similarities of the neighbours
        weights = (sim / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, *, k: int = 200, temperature: float = 0.1) -> float:
    """Top-1 accuracy of :func:`knn_predict` (classes from the labels of both splits)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, test_features, num_classes=num_classes, k=k,
                         temperature=temperature)
    return float((scores.argmax(dim=1) == test_labels).float().mean())


def knn_eval(encoder, train, test, settings, *, k: int = 200, temperature: float = 0.1) -> dict[str, float]:
    """kNN top-1 of a frozen encoder: the training split's centre-crop features are the memory bank.

    Args:
        encoder: the frozen encoder.
        train, test: :class:`byol_ray.evaluation.data.Split` s.
        settings: :class:`byol_ray.evaluation.data.LoaderSettings`.
        k, temperature: as in :func:`knn_predict`.

    Returns:
        ``knn_top1`` with ``k``, ``temperature`` and the split sizes.
    """
    from byol_ray.evaluation.data import eval_loader
    from byol_ray.evaluation.features import extract_features

    encoder = encoder.to(settings.device).eval()
    train_x, train_y = extract_features(encoder, eval_loader(train, settings), settings.device)
    test_x, test_y = extract_features(encoder, eval_loader(test, settings), settings.device)
    top1 = knn_top1(train_x, train_y, test_x, test_y, k=k, temperature=temperature)
    return {"knn_top1": top1, "knn_k": min(k, len(train_y)), "knn_temperature": temperature,
            "num_train": len(train_y), "num_test": len(test_y)}
