"""Maxout networks (Goodfellow et al. 2013): each unit outputs the max over ``k`` linear pieces.

A maxout layer is a Linear (or conv) producing ``units * k`` features followed by :class:`Maxout`, which
takes the max over each group of ``k`` *adjacent* features (pylearn2's layout: feature ``u * k + p`` is
piece ``p`` of unit ``u``). The layer therefore hands ``k`` times fewer inputs to the next layer, and the
piece that wins each max is a built-in measure of which pieces a unit actually uses: the
``maxout_activity`` pruning criterion (:mod:`lit_compress.pruning.neuron_criteria`) counts those wins to
prune the least active pieces (Moya Rueda, Grzeszick & Fink, "Neuron Pruning for Compressing Deep Networks
using Maxout Architectures", GCPR 2017).

Goodfellow, Warde-Farley, Mirza, Courville & Bengio, "Maxout Networks", ICML 2013.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lit_compress.models.registry import register_model

__all__ = ["Maxout", "MaxoutMLP"]


class Maxout(nn.Module):
    """Max over groups of ``pieces`` adjacent features along ``dim``.

    Input ``[..., units * pieces, ...]`` (``units * pieces`` at ``dim``) -> output ``[..., units, ...]``,
    ``out[u] = max_p in[u * pieces + p]``. ``dim=1`` fits both a Linear output ``[N, F]`` and a conv output
    ``[N, C, H, W]``; use ``dim=-1`` after a Linear applied to ``[N, T, F]``.

    Custom maxout implementations that should be visible to the ``maxout_activity`` criterion subclass
    this module (the criterion finds maxout layers by ``isinstance``).
    """

    def __init__(self, pieces: int, dim: int = 1) -> None:
        super().__init__()
        if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1:
            raise ValueError(f"Maxout: pieces must be a positive int (features per unit), got {pieces!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"Maxout: dim must be an int (the feature dimension), got {dim!r}")
        self.pieces = pieces
        self.dim = dim

    def extra_repr(self) -> str:
        return f"pieces={self.pieces}, dim={self.dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dim % x.ndim
        size = x.shape[d]
        if size % self.pieces:
            raise ValueError(
                f"Maxout(pieces={self.pieces}): dim {self.dim} of the input has {size} features, not a "
                f"multiple of {self.pieces}; the producing layer must output units * pieces features."
            )
        shape = (*x.shape[:d], size // self.pieces, self.pieces, *x.shape[d + 1 :])
        return x.reshape(shape).amax(dim=d + 1)


class MaxoutMLP(nn.Module):
    """Flatten -> [Dropout -> Linear(units * pieces) -> Maxout(pieces)] x len(units) -> Dropout -> Linear.

    Layers: ``hidden.<i>`` (the Linear maps that feed the maxouts: the ``maxout_activity`` targets),
    ``maxout.<i>`` and ``head``. Defaults are Goodfellow et al.'s permutation-invariant MNIST net (2 maxout
    layers of 240 units x 5 pieces; 1,233,610 parameters on 28x28 input); dropout is off by default like
    the other reference MLPs (the paper used 0.2 on the input and 0.5 on the hidden layers).
    """

    def __init__(
        self,
        units: Sequence[int] = (240, 240),
        pieces: int = 5,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        units = list(units)
        if not units or any(isinstance(u, bool) or not isinstance(u, int) or u < 1 for u in units):
            raise ValueError(f"MaxoutMLP: units must be a non-empty list of positive ints, got {units!r}")
        if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1:
            raise ValueError(f"MaxoutMLP: pieces must be a positive int, got {pieces!r}")
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"MaxoutMLP: {name} must be in [0, 1), got {p}")
        self.units = units
        self.pieces = pieces
        widths = [in_chans * img_size * img_size, *units]
        self.input_dropout = nn.Dropout(input_dropout)
        self.hidden = nn.ModuleList(nn.Linear(a, u * pieces) for a, u in zip(widths[:-1], units))
        self.maxout = nn.ModuleList(Maxout(pieces) for _ in units)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(units[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(torch.flatten(x, 1))
        for i, (layer, maxout) in enumerate(zip(self.hidden, self.maxout)):
            if i:
                x = self.dropout(x)
            x = maxout(layer(x))
        return self.head(self.dropout(x))


@register_model("maxout_mlp")
def maxout_mlp(**kwargs) -> MaxoutMLP:
    return MaxoutMLP(**kwargs)
