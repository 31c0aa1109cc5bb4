"""BYOL's regression loss: normalised MSE between online predictions and target projections."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(prediction: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||q̄ - z̄'||² = 2 - 2·cos(q, z')`` with l2-normalised inputs.

    Args:
        prediction: online predictions ``q_θ(z_θ)``, shape [B, D].
        projection: target projections ``z'_ξ``, shape [B, D]; must already be detached.

    Returns:
        Loss per sample, shape [B].
    """
    # float32 for the normalisation: under bf16 autocast the cosine of near-identical vectors
    # loses most of its digits.
    q = F.normalize(prediction.float(), dim=-1, eps=1e-12)
    z = F.normalize(projection.float(), dim=-1, eps=1e-12)
    return 2.0 - 2.0 * (q * z).sum(dim=-1)


def byol_loss(
    prediction1: torch.Tensor,
    prediction2: torch.Tensor,
    target_projection1: torch.Tensor,
    target_projection2: torch.Tensor,
) -> torch.Tensor:
    """Symmetrised BYOL loss: view 1's prediction regresses view 2's target projection and vice versa.

    The two directions are SUMMED, then averaged over the batch (the paper's L + L~; averaging the
    two halves the effective learning rate).

    Returns:
        Scalar loss in [0, 8].
    """
    loss = regression_loss(prediction1, target_projection2.detach())
    loss = loss + regression_loss(prediction2, target_projection1.detach())
    return loss.mean()
