"""Hinton et al.'s MNIST MLPs (e.g. 2x800 student, 2x1200 teacher in the distillation paper)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from lit_compress.models.registry import register_model


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] x len(hidden) -> Linear; layers ``hidden.<i>`` and ``head``."""

    def __init__(
        self,
        hidden: Sequence[int] = (800, 800),
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ):
        super().__init__()
        hidden = list(hidden)
        if not hidden or any(int(h) <= 0 for h in hidden):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}")
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        widths = [in_chans * img_size * img_size, *map(int, hidden)]
        self.input_dropout = nn.Dropout(input_dropout)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], num_classes)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(torch.flatten(x, 1))
        for layer in self.hidden:
            x = self.dropout(self.relu(layer(x)))
        return self.head(x)


@register_model("mlp")
def mlp(**kwargs) -> MLP:
    return MLP(**kwargs)


@register_model("mlp_2x800")
def mlp_2x800(**kwargs) -> MLP:
    return MLP(hidden=(800, 800), **kwargs)


@register_model("mlp_2x1200")
def mlp_2x1200(**kwargs) -> MLP:
    return MLP(hidden=(1200, 1200), **kwargs)
