"""CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of 16/32/64 channels.

Optional stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"): in training each image
skips each block's residual branch with a probability rising linearly from 0 to ``drop_path_rate`` over the
blocks (timm's ``drop_path_rate`` convention: kept branches are scaled by ``1 / keep`` so eval needs no
change). A network trained so keeps its accuracy when single blocks are skipped, which is what per-image
block skipping (BlockDrop) needs from its backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.models.registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

    Shortcut "A" (the paper's CIFAR choice) subsamples and zero-pads channels: no parameters.
    Shortcut "B" uses a strided 1x1 conv + BN where the shape changes.
    """

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A", drop_path: float = 0.0
    ):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path (the block's skip probability) must be in [0, 1), got {drop_path}")
        self.drop_path = float(drop_path)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.pad = 0
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.pad = planes - in_planes
                self.stride = stride
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.training and self.drop_path > 0.0:
            keep = 1.0 - self.drop_path
            mask = torch.empty(out.shape[0], 1, 1, 1, dtype=out.dtype, device=out.device).bernoulli_(keep)
            out = out * (mask / keep)
        if self.pad:
            identity = x[:, :, :: self.stride, :: self.stride]
            identity = F.pad(identity, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            identity = self.shortcut(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-{20,32,44,56,110} for 32x32 (or 28x28) images with 1 or 3 input channels."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 16,
        shortcut: str = "A",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding) or 'B' (1x1 conv), got {shortcut!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(
                f"drop_path_rate (stochastic depth: the last block's skip probability) must be in [0, 1), "
                f"got {drop_path_rate}"
            )
        n = (depth - 2) // 6
        rates = [drop_path_rate * (i + 1) / (3 * n) for i in range(3 * n)]  # linear decay, Huang et al.
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes = [width, 2 * width, 4 * width]
        in_planes = width
        stages = []
        for i, p in enumerate(planes):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, p, stride, shortcut, rates[i * n + j]))
                in_planes = p
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("resnet")
def resnet(**kwargs) -> CifarResNet:
    return CifarResNet(**kwargs)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(lambda _d=_depth, **kw: CifarResNet(depth=_d, **kw))
