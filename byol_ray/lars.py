"""LARS (You et al., 2017) as BYOL runs it, and the parameter groups that exclude biases and norms."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with heavy-ball momentum.

    Per parameter ``w`` with gradient ``g`` (DeepMind's ``byol/utils/optimizers.py``)::

        u     = g + weight_decay * w
        u     = u * eta * ||w|| / ||u||        (1 when either norm is 0; only if lars_adaptation)
        m     = momentum * m + u               (no Nesterov, no dampening)
        w     = w - lr * m

    Biases and normalisation parameters go in a group with ``weight_decay=0`` and
    ``lars_adaptation=False`` (see :func:`param_groups`).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 1e-3,
        lars_adaptation: bool = True,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(
                f"LARS: invalid hyperparameters lr={lr}, weight_decay={weight_decay}, "
                f"momentum={momentum}, eta={eta} (need lr>=0, weight_decay>=0, 0<=momentum<1, eta>0)"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_adaptation=lars_adaptation
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer API
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0:
                updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            else:
                updates = [g.clone() for g in grads]
            if group["lars_adaptation"]:
                param_norms = torch._foreach_norm(params)
                update_norms = torch._foreach_norm(updates)
                trust = [
                    torch.where((pn > 0) & (un > 0), group["eta"] * pn / un, torch.ones_like(pn))
                    for pn, un in zip(param_norms, update_norms)
                ]
                torch._foreach_mul_(updates, trust)
            buffers = []
            for p, u in zip(params, updates):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Split parameters into a regular group and an excluded group (biases and normalisation).

    The excluded group gets neither weight decay nor the trust-ratio adaptation, as in the paper.

    Args:
        modules: the trained modules (online encoder, projector, predictor, classifier).
        weight_decay: weight decay of the regular group.

    Returns:
        Two param-group dicts for :class:`LARS`, regular first; an empty group is dropped.
    """
    regular, excluded, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if isinstance(sub, _NORM_TYPES) or name == "bias":
                    excluded.append(p)
                else:
                    regular.append(p)
    groups = [
        {"params": regular, "weight_decay": weight_decay, "lars_adaptation": True, "name": "regular"},
        {"params": excluded, "weight_decay": 0.0, "lars_adaptation": False, "name": "bias_and_norm"},
    ]
    return [g for g in groups if g["params"]]
