"""BYOL's two networks: online (encoder → projector → predictor) and target (EMA of encoder → projector)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from byol_ray.encoders import build_encoder

if TYPE_CHECKING:
    from byol_ray.config import ModelConfig


class MLP(nn.Sequential):
    """Projector / predictor: Linear(bias) → BatchNorm → ReLU → Linear(no bias)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, bn_momentum: float = 0.1, bn_eps: float = 1e-5):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, momentum=bn_momentum, eps=bn_eps),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )


class OnlineNetwork(nn.Module):
    """θ: encoder f_θ, projector g_θ, predictor q_θ, and an optional linear probe on sg(y).

    Both views go through the networks separately, so BatchNorm statistics are per view. Only this
    module is wrapped in DDP; the target reads it unwrapped.
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module, classifier: nn.Module | None):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor
        self.classifier = classifier

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        y1, y2 = self.encoder(view1), self.encoder(view2)
        z1, z2 = self.projector(y1), self.projector(y2)
        out = {"prediction1": self.predictor(z1), "prediction2": self.predictor(z2), "projection1": z1}
        if self.classifier is not None:
            out["logits"] = self.classifier(y1.detach())  # stop_gradient: the probe never shapes y
        return out


class TargetNetwork(nn.Module):
    """ξ: the same encoder + projector, updated only by EMA; runs in training mode (batch statistics)."""

    def __init__(self, online: OnlineNetwork):
        super().__init__()
        self.encoder = copy.deepcopy(online.encoder)
        self.projector = copy.deepcopy(online.projector)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, view: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(view))

    def ema_parameters(self) -> list[torch.Tensor]:
        return [*self.encoder.parameters(), *self.projector.parameters()]


def online_ema_parameters(online: OnlineNetwork) -> list[torch.Tensor]:
    """The online parameters the target tracks, in the same order as ``TargetNetwork.ema_parameters``."""
    return [*online.encoder.parameters(), *online.projector.parameters()]


@torch.no_grad()
def update_target(target: TargetNetwork, online: OnlineNetwork, tau: float) -> None:
    """ξ ← τ·ξ + (1 − τ)·θ over all target parameters, one fused multi-tensor op.

    BatchNorm running statistics are not averaged: the target keeps its own (docs/recipe.md).

    Args:
        target: the target network.
        online: the online network, UNWRAPPED from DDP.
        tau: decay τ_k in [0, 1].
    """
    # lerp(ξ, θ, w) = ξ + w·(θ − ξ) = τ·ξ + (1 − τ)·θ with w = 1 − τ
    torch._foreach_lerp_(target.ema_parameters(), online_ema_parameters(online), 1.0 - tau)


def build_byol(encoder: nn.Module, *, projector_hidden_dim: int, projector_dim: int, predictor_hidden_dim: int,
               use_predictor: bool = True, num_classes: int = 0, bn_momentum: float = 0.1,
               bn_eps: float = 1e-5) -> tuple[OnlineNetwork, TargetNetwork]:
    """Assemble the online network and a target initialised as an exact copy of it.

    Args:
        encoder: module mapping images to [B, encoder.feature_dim].
        projector_hidden_dim, projector_dim: projector g widths (4096, 256 in the paper).
        predictor_hidden_dim: predictor q hidden width (4096).
        use_predictor: False replaces q with the identity (the paper's collapse ablation).
        num_classes: > 0 adds the online linear classifier on stop_gradient(y).
        bn_momentum, bn_eps: BatchNorm settings of the MLPs.

    Returns:
        (online, target).
    """
    dim = encoder.feature_dim
    projector = MLP(dim, projector_hidden_dim, projector_dim, bn_momentum, bn_eps)
    predictor = MLP(projector_dim, predictor_hidden_dim, projector_dim, bn_momentum, bn_eps) if use_predictor else nn.Identity()
    classifier = nn.Linear(dim, num_classes) if num_classes > 0 else None
    online = OnlineNetwork(encoder, projector, predictor, classifier)
    return online, TargetNetwork(online)


def build_networks(m: ModelConfig) -> tuple[OnlineNetwork, TargetNetwork]:
    """The online and target networks of a ``model`` config: what :class:`~byol_ray.engine.BYOLEngine` trains
    and what :func:`~byol_ray.registry.encoder_from_checkpoint` rebuilds to load a checkpoint into (one
    build, so that a checkpoint's keys always match). Initial weights come from torch's global RNG.

    Args:
        m: the config's ``model`` section.

    Returns:
        (online, target), on the CPU, with plain BatchNorm (the engine converts to SyncBatchNorm if needed).
    """
    encoder = build_encoder(m.encoder, cifar_stem=m.cifar_stem, bn_momentum=m.bn_momentum, bn_eps=m.bn_eps)
    return build_byol(
        encoder, projector_hidden_dim=m.projector_hidden_dim, projector_dim=m.projector_dim,
        predictor_hidden_dim=m.predictor_hidden_dim, use_predictor=m.use_predictor,
        num_classes=m.num_classes if m.online_classifier else 0, bn_momentum=m.bn_momentum, bn_eps=m.bn_eps,
    )
