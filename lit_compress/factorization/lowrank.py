"""Low-rank factorization of ``Linear`` and ``Conv2d`` layers by truncated SVD (seed 001, "Architecture
Design": an ``N x M`` layer becomes ``K x (N + M)`` parameters and multiply-accumulates).

Every scheme views the layer's weight as one matrix ``A`` (``r x c``), takes its SVD ``A = U S V^T`` and keeps
the ``K`` largest singular values: ``A ~ (U_K S_K^1/2)(S_K^1/2 V_K^T)``, the best rank-``K`` approximation in
the Frobenius norm (Eckart-Young). The square root of ``S`` goes to both factors so they have the same scale
(neither layer starts with tiny or huge weights, which keeps fine-tuning with weight decay balanced). The
factorized layer stores ``K (r + c)`` weights instead of ``r c`` and costs as many MACs per output position,
so it only pays when ``K < r c / (r + c)``.

- ``Linear`` (``W``: ``N x M``): ``A = W``; ``Linear(M -> K, no bias)`` then ``Linear(K -> N, bias)``.
- ``Conv2d``, scheme ``"channel"`` (channel decomposition, Zhang et al. 2015 without the data term):
  ``A = W.reshape(N, C k_h k_w)``; ``Conv2d(C -> K, k_h x k_w)`` with the layer's stride, padding, dilation
  and padding mode, no bias, then ``Conv2d(K -> N, 1 x 1, bias)``.
- ``Conv2d``, scheme ``"spatial"`` (Jaderberg, Vedaldi, Zisserman 2014, scheme 2; closed form of Tai et al.
  2016): ``A[(c, i), (n, j)] = W[n, c, i, j]`` (``C k_h x N k_w``); a vertical ``Conv2d(C -> K, k_h x 1)``
  (the vertical half of stride / padding / dilation, no bias) then a horizontal ``Conv2d(K -> N, 1 x k_w)``
  (the horizontal half, bias). Both are exact at full rank, zero padding included: the vertical filter of a
  padded column is the padded column of the vertical output, so padding the intermediate map horizontally
  is the same as padding the input (also for reflect / replicate / circular padding, applied per axis).

The factorized pairs are :class:`LowRankLinear` / :class:`LowRankConv2d`, subclasses of ``nn.Sequential`` of
plain ``nn.Linear`` / ``nn.Conv2d`` layers: MAC and parameter counting, pruning and quantization see ordinary
layers (``fc1.0``, ``fc1.1``). They remember the original layer's constructor arguments, so the dense
architecture they replace can be rebuilt (:meth:`LowRankLinear.dense_like`) for structure specs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CONV_SCHEMES",
    "LowRankConv2d",
    "LowRankLinear",
    "check_factorizable",
    "factorize",
    "factorized_weight_count",
    "layer_matrix",
    "max_rank",
    "rank_for_budget",
    "rank_for_energy",
    "singular_values",
]

CONV_SCHEMES = ("channel", "spatial")


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return rank


class LowRankLinear(nn.Sequential):
    """``Linear(in -> out)`` as ``Linear(in -> rank, no bias)`` followed by ``Linear(rank -> out, bias)``.

    Weights are freshly initialised; :func:`factorize` fills them from the SVD of a trained layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        rank = _check_rank(rank)
        super().__init__(
            nn.Linear(in_features, rank, bias=False, **factory),
            nn.Linear(rank, out_features, bias=bias, **factory),
        )
        self.in_features, self.out_features = int(in_features), int(out_features)

    @property
    def rank(self) -> int:
        return self[0].out_features

    def dense_like(self, device: Any = "meta") -> nn.Linear:
        """A plain ``nn.Linear`` of the shape this pair replaces (weights uninitialised on ``meta``)."""
        return nn.Linear(self.in_features, self.out_features, bias=self[1].bias is not None, device=device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def dense_conv_like(pair: nn.Sequential, device: Any = "meta") -> nn.Conv2d:
    """The plain ``nn.Conv2d`` a two-conv replacement stands for: its recorded geometry, the bias of its
    second conv (shared by the low-rank and depthwise-separable pairs)."""
    return nn.Conv2d(
        pair.in_channels,
        pair.out_channels,
        pair.kernel_size,
        pair.stride,
        pair.padding,
        pair.dilation,
        bias=pair[1].bias is not None,
        padding_mode=pair.padding_mode,
        device=device,
    )


class LowRankConv2d(nn.Sequential):
    """``Conv2d(C -> N, k_h x k_w)`` as two convolutions of rank ``K`` (``scheme``: see the module docstring).

    The arguments are those of the ``nn.Conv2d`` being replaced (``groups`` must be 1) plus ``rank`` and
    ``scheme``. Weights are freshly initialised; :func:`factorize` fills them from a trained layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        scheme: str = "channel",
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if scheme not in CONV_SCHEMES:
            raise ValueError(f"scheme must be one of {CONV_SCHEMES}, got {scheme!r}")
        rank = _check_rank(rank)
        factory = {"device": device, "dtype": dtype}
        k, s, d = _pair(kernel_size), _pair(stride), _pair(dilation)
        p: Any = padding if isinstance(padding, str) else _pair(padding)
        common = {"padding_mode": padding_mode, **factory}
        if scheme == "channel":
            first = nn.Conv2d(in_channels, rank, k, s, p, d, bias=False, **common)
            second = nn.Conv2d(rank, out_channels, 1, bias=bias, **factory)
        else:
            p_v, p_h = (p, p) if isinstance(p, str) else ((p[0], 0), (0, p[1]))
            first = nn.Conv2d(in_channels, rank, (k[0], 1), (s[0], 1), p_v, (d[0], 1), bias=False, **common)
            second = nn.Conv2d(rank, out_channels, (1, k[1]), (1, s[1]), p_h, (1, d[1]), bias=bias, **common)
        super().__init__(first, second)
        self.scheme = scheme
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.dilation, self.padding = k, s, d, p
        self.padding_mode = padding_mode

    @property
    def rank(self) -> int:
        return self[0].out_channels

    def dense_like(self, device: Any = "meta") -> nn.Conv2d:
        """A plain ``nn.Conv2d`` of the shape this pair replaces (weights uninitialised on ``meta``)."""
        return dense_conv_like(self, device)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"scheme={self.scheme!r}"
        )


def check_factorizable(layer: nn.Module, name: str = "layer", scheme: str = "channel") -> None:
    """Raise ValueError / TypeError when ``layer`` cannot be factorized by this module (with the reason)."""
    if scheme not in CONV_SCHEMES:
        raise ValueError(f"conv scheme must be one of {CONV_SCHEMES}, got {scheme!r}")
    if isinstance(layer, nn.Linear):
        return
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(
                f"{name} is a grouped convolution (groups={layer.groups}); low-rank factorization handles "
                "dense convolutions (groups=1) only: exclude it"
            )
        return
    raise TypeError(
        f"{name} is a {type(layer).__name__}; low-rank factorization handles nn.Linear and nn.Conv2d only"
    )


def layer_matrix(layer: nn.Module, scheme: str = "channel") -> Tensor:
    """The weight viewed as the matrix whose SVD the scheme truncates (see the module docstring)."""
    check_factorizable(layer, scheme=scheme)
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return w
    n, c, kh, kw = w.shape
    if scheme == "channel":
        return w.reshape(n, c * kh * kw)
    return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def max_rank(layer: nn.Module, scheme: str = "channel") -> int:
    """``min(r, c)`` of :func:`layer_matrix`: the largest rank a factorization can have."""
    return min(_matrix_shape(layer, scheme))


def _matrix_shape(layer: nn.Module, scheme: str) -> tuple[int, int]:
    check_factorizable(layer, scheme=scheme)
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    (kh, kw), n, c = layer.kernel_size, layer.out_channels, layer.in_channels
    return (n, c * kh * kw) if scheme == "channel" else (c * kh, n * kw)


def factorized_weight_count(layer: nn.Module, rank: int, scheme: str = "channel") -> int:
    """Weights of the rank-``rank`` factorization, ``rank * (r + c)`` (biases are kept unchanged)."""
    r, c = _matrix_shape(layer, scheme)
    return rank * (r + c)


def singular_values(layer: nn.Module, scheme: str = "channel") -> Tensor:
    """Singular values of :func:`layer_matrix`, descending, in float64 on the CPU."""
    return torch.linalg.svdvals(layer_matrix(layer, scheme).to("cpu", torch.float64))


def rank_for_energy(values: Tensor, energy: float) -> int:
    """Smallest ``K`` whose leading singular values keep ``energy`` of the squared sum: ``sum_{i<K} s_i^2 >=
    energy * sum_i s_i^2``. A relative slack of 1e-9 absorbs float round-off (``energy=1.0`` gives the
    numerical rank instead of failing on the last ulp)."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a number in (0, 1] (0.9 keeps 90% of sum(s^2)), got {energy!r}")
    sq = values.detach().to("cpu", torch.float64) ** 2
    cumulative = torch.cumsum(sq, 0)
    total = float(cumulative[-1])
    if total == 0.0:
        return 1
    index = int(
        torch.searchsorted(cumulative, torch.tensor(energy * total * (1 - 1e-9), dtype=torch.float64))
    )
    return min(index + 1, len(values))


def rank_for_budget(layer: nn.Module, fraction: float, scheme: str = "channel", name: str = "layer") -> int:
    """Largest ``K`` with ``K (r + c) <= fraction * r c``: the factorized weights fit in ``fraction`` of the
    layer's weights. Raises ValueError when even rank 1 does not fit."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(
            f"param_budget must be a number in (0, 1) (0.25 keeps a quarter of the layer's weights), "
            f"got {fraction!r}"
        )
    r, c = _matrix_shape(layer, scheme)
    rank = math.floor(fraction * r * c / (r + c) + 1e-9)
    if rank < 1:
        raise ValueError(
            f"param_budget {fraction} for {name} ({r} x {c} weight matrix) allows no rank: rank 1 already "
            f"keeps {(r + c) / (r * c):.2%} of its {r * c} weights; raise the budget or exclude {name}"
        )
    return rank


def factorize(layer: nn.Module, rank: int, scheme: str = "channel", name: str = "layer") -> nn.Sequential:
    """The rank-``rank`` truncated-SVD factorization of ``layer`` (a new module; ``layer`` is untouched).

    Returns a :class:`LowRankLinear` or :class:`LowRankConv2d` on ``layer``'s device and dtype whose output
    equals ``layer``'s up to float round-off at full rank. Raises ValueError when ``rank`` exceeds
    :func:`max_rank` (the message names ``name`` and the bound).
    """
    check_factorizable(layer, name, scheme)
    rank = _check_rank(rank)
    bound = max_rank(layer, scheme)
    if rank > bound:
        r, c = _matrix_shape(layer, scheme)
        raise ValueError(
            f"rank {rank} for {name} exceeds its maximum rank {bound} (min of its {r} x {c} weight matrix); "
            f"use a rank <= {bound}"
        )
    w = layer.weight
    u, s, vh = torch.linalg.svd(layer_matrix(layer, scheme).to("cpu", torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    left = (u[:, :rank] * root).to(w.device, w.dtype)  # r x K
    right = (root[:, None] * vh[:rank]).to(w.device, w.dtype)  # K x c
    has_bias = layer.bias is not None
    factory = {"device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Linear):
        new: nn.Sequential = LowRankLinear(layer.in_features, layer.out_features, rank, has_bias, **factory)
        weights = (right, left)
    else:
        new = LowRankConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            rank,
            scheme,
            layer.stride,
            layer.padding,
            layer.dilation,
            has_bias,
            layer.padding_mode,
            **factory,
        )
        n, c, kh, kw = w.shape
        if scheme == "channel":
            weights = (right.reshape(rank, c, kh, kw), left.reshape(n, rank, 1, 1))
        else:  # left: (c, i) x K -> vertical [K, C, kh, 1]; right: K x (n, j) -> horizontal [N, K, 1, kw]
            vertical = left.T.reshape(rank, c, kh, 1)
            horizontal = right.reshape(rank, n, kw).permute(1, 0, 2).unsqueeze(2)
            weights = (vertical, horizontal)
    with torch.no_grad():
        new[0].weight.copy_(weights[0])
        new[1].weight.copy_(weights[1])
        if has_bias:
            new[1].bias.copy_(layer.bias)
    for p, old in ((new[0].weight, w), (new[1].weight, w), (new[1].bias, layer.bias)):
        if p is not None:
            p.requires_grad_(old.requires_grad)
    return new.train(layer.training)
