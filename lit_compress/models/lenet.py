"""LeNet-300-100 and LeNet-5 as used by Han et al. (2015) and Deep Compression (Caffe's variants)."""

from __future__ import annotations

import torch
from torch import nn

from lit_compress.models.registry import register_model


class LeNet300100(nn.Module):
    """784-300-100-10 fully connected net with ReLUs: 266,610 parameters on 28x28 input."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, dropout: float = 0.0):
        super().__init__()
        _check_dropout(dropout)
        self.fc1 = nn.Linear(in_chans * img_size * img_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        # Dropout is off by default (Han's dense reference); pruning recipes may rescale it when retraining.
        self.dropout = nn.Dropout(dropout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.dropout(self.relu(self.fc1(x)))
        x = self.dropout(self.relu(self.fc2(x)))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet (20-50-500): 431,080 parameters and 2,293,000 MACs on a 28x28 image.

    Caffe's prototxt has no non-linearity after the convolutions, only after ``fc1``;
    ``conv_relu=True`` adds ReLUs after each pooling (same parameter and MAC counts). ``widths`` sets the
    conv1 / conv2 channels and fc1 units (``lenet5_small`` is ``(12, 30, 200)``: 4.0x fewer parameters).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        dropout: float = 0.0,
        conv_relu: bool = False,
        widths: tuple[int, int, int] | list[int] = (20, 50, 500),
    ):
        super().__init__()
        _check_dropout(dropout)
        if len(widths) != 3 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be three positive ints (conv1, conv2, fc1), got {widths!r}")
        c1, c2, hidden = widths
        if img_size < 16 or (img_size - 4) % 2 or ((img_size - 4) // 2 - 4) % 2:
            raise ValueError(f"img_size={img_size} does not divide evenly through LeNet-5; use 28 or 32")
        self.conv1 = nn.Conv2d(in_chans, c1, kernel_size=5)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.conv_act = nn.ReLU() if conv_relu else nn.Identity()
        side = ((img_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_act(self.pool(self.conv1(x)))
        x = self.conv_act(self.pool(self.conv2(x)))
        x = self.dropout(torch.flatten(x, 1))
        x = self.dropout(self.relu(self.fc1(x)))
        return self.fc2(x)


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")


@register_model("lenet_300_100")
def lenet_300_100(**kwargs) -> LeNet300100:
    return LeNet300100(**kwargs)


@register_model("lenet5")
def lenet5(**kwargs) -> LeNet5:
    return LeNet5(**kwargs)


@register_model("lenet5_small")
def lenet5_small(**kwargs) -> LeNet5:
    """LeNet-5 with 12-30-200 widths: 107,552 parameters, 4.0x fewer than Caffe's 20-50-500."""
    return LeNet5(widths=(12, 30, 200), **kwargs)
