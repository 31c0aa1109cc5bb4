"""Encoders f: torchvision ResNets without the classifier, a CIFAR stem option, and a tiny CPU encoder."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

# feature dimension after global average pooling
FEATURE_DIMS = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
    "wide_resnet50_2": 2048, "wide_resnet101_2": 2048,
}

# CPU conv nets: channels per stage (the first stage keeps the resolution, the others halve it)
TINY_WIDTHS = {"tiny": (16, 32, 64, 128), "small": (32, 64, 128, 256)}


class TinyEncoder(nn.Module):
    """A four-stage conv net for tests and CPU runs; same interface as a ResNet.

    ``tiny`` is 16→128 channels (about 4 M multiply-adds per 32-px image); ``small`` is 32→256 (about
    15 M), the CPU ablation's encoder.
    """

    def __init__(self, norm_layer=nn.BatchNorm2d, widths: tuple[int, ...] = TINY_WIDTHS["tiny"]) -> None:
        super().__init__()
        layers, in_ch = [], 3
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(in_ch, width, 3, stride, 1, bias=False), norm_layer(width), nn.ReLU(inplace=True)]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def build_encoder(name: str, *, cifar_stem: bool = False, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> nn.Module:
    """Build an encoder returning [B, feature_dim] representations ``y``; ``.feature_dim`` is set.

    Args:
        name: ``tiny``, ``small`` or a torchvision ResNet name (``resnet18`` ... ``wide_resnet101_2``).
        cifar_stem: replace the 7x7 stride-2 conv + max-pool with a 3x3 stride-1 conv (32 px images).
        bn_momentum: PyTorch BatchNorm momentum (0.1 = the paper's decay 0.9).
        bn_eps: BatchNorm epsilon.

    Returns:
        The randomly initialised encoder (no pretrained weights: nothing is downloaded).
    """
    norm_layer = partial(nn.BatchNorm2d, momentum=bn_momentum, eps=bn_eps)
    if name in TINY_WIDTHS:
        return TinyEncoder(norm_layer=norm_layer, widths=TINY_WIDTHS[name])
    if name not in FEATURE_DIMS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join([*TINY_WIDTHS, *FEATURE_DIMS])}")
    import torchvision.models  # here, not at the top: about 1 s of import that the tiny and small encoders skip

    net = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.feature_dim = FEATURE_DIMS[name]
    return net
