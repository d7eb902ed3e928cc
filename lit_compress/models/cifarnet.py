"""A small VGG-style conv net ("cifarnet"): two conv pairs, pooling, two linear layers."""

from __future__ import annotations

import torch
from torch import nn

from lit_compress.models.registry import register_model


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class CifarNet(nn.Module):
    """features (conv-bn-relu x2, maxpool) x2 -> flatten -> classifier (Linear-ReLU-Dropout-Linear).

    The flatten-to-linear transition is kept on purpose: structured pruning must handle it.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        width: int = 32,
        hidden: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be divisible by 4 (two 2x2 poolings), got {img_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.features = nn.Sequential(
            _conv_bn(in_chans, width),
            _conv_bn(width, width),
            nn.MaxPool2d(2),
            _conv_bn(width, 2 * width),
            _conv_bn(2 * width, 2 * width),
            nn.MaxPool2d(2),
        )
        side = img_size // 4
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("cifarnet")
def cifarnet(**kwargs) -> CifarNet:
    return CifarNet(**kwargs)
