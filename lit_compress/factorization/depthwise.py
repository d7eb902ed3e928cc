"""Depthwise-separable replacement of a standard convolution (MobileNet; seed 001, "Architecture Design").

``Conv2d(C -> N, k x k)`` becomes a depthwise ``Conv2d(C -> C m, k x k, groups=C)`` (``m`` filters per input
channel, the depth multiplier; MobileNet uses ``m = 1``) followed by a pointwise ``Conv2d(C m -> N, 1 x 1)``.
Weights: ``C m k^2 + C m N`` instead of ``N C k^2``, a ratio of ``m / N + m / k^2`` (MACs per output position
likewise). The pair is :class:`DepthwiseSeparableConv2d`, an ``nn.Sequential`` of two plain ``nn.Conv2d``.

**Initialisation.** The replacement computes ``y[n] = sum_c sum_j P[n, (c, j)] (D[(c, j)] * x[c])``, so its
kernel is ``W_hat[n, c] = sum_j P[n, (c, j)] D[(c, j)]``: for each input channel ``c`` the ``N x k^2`` slice
``W[:, c]`` is approximated by a rank-``m`` product. Two methods:

1. *Kernel* (``depthwise_from_kernel``): the truncated SVD of every slice ``W[:, c]`` (batched), the best
   approximation of the kernel in the Frobenius norm. A convolution that is itself depthwise-separable
   (each slice of rank <= ``m``) is reproduced exactly.
2. *Activations* (``fit_depthwise``): minimise the error on the layer's real inputs,
   ``E || W phi + b - (W_hat phi + b_hat) ||^2`` over sampled input patches ``phi`` (the ``C k^2`` values one
   output position reads). The target is the original layer's output, which is linear in ``phi``, so the
   data enters only through the patch second moment ``M = E[phi~ phi~^T]`` (``phi~ = [phi; 1]``, collected by
   :func:`patch_moment` on a few batches, no activations kept): the error is ``tr(Delta M Delta^T)`` with
   ``Delta = [W - W_hat, b - b_hat]``. Starting from the kernel SVD, alternating least squares solves exactly
   for the pointwise weights and bias given the depthwise filters (normal equations ``Q (A M A^T) = W~ M
   A^T``), then for all depthwise filters given the pointwise weights (one linear system of size ``C m
   k^2`` whose matrix is ``(P^T P)[(c,j),(c',j')] * M[(c,t),(c',t')]``). Each half-step cannot increase the
   error, so the result is never worse on the sampled data than the kernel SVD, which it starts from. The
   cost is one ``(C m k^2)^3`` solve per iteration (C = 256, k = 3: about a second).

Inputs are the original network's activations (the layer is fitted to its own inputs, not to those of
already-replaced earlier layers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_compress.factorization.lowrank import dense_conv_like

__all__ = [
    "DepthwiseSeparableConv2d",
    "PatchMoment",
    "check_separable_target",
    "depthwise_from_kernel",
    "depthwise_ratio",
    "fit_depthwise",
    "input_patches",
    "output_error",
    "patch_moment",
]


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class DepthwiseSeparableConv2d(nn.Sequential):
    """A depthwise ``Conv2d(C -> C m, k, groups=C, no bias)`` then a pointwise ``Conv2d(C m -> N, 1, bias)``.

    The arguments are those of the ``nn.Conv2d`` being replaced plus ``multiplier`` (``m``). Stride, padding,
    dilation and padding mode go to the depthwise conv. Weights are freshly initialised.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        multiplier: int = 1,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if isinstance(multiplier, bool) or not isinstance(multiplier, int) or multiplier < 1:
            raise ValueError(
                f"multiplier must be a positive int (filters per input channel), got {multiplier!r}"
            )
        factory = {"device": device, "dtype": dtype}
        k, s, d = _pair(kernel_size), _pair(stride), _pair(dilation)
        p: Any = padding if isinstance(padding, str) else _pair(padding)
        mid = in_channels * multiplier
        super().__init__(
            nn.Conv2d(
                in_channels,
                mid,
                k,
                s,
                p,
                d,
                groups=in_channels,
                bias=False,
                padding_mode=padding_mode,
                **factory,
            ),
            nn.Conv2d(mid, out_channels, 1, bias=bias, **factory),
        )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding, self.dilation = k, s, p, d
        self.padding_mode = padding_mode

    @property
    def multiplier(self) -> int:
        return self[0].out_channels // self[0].in_channels

    def dense_like(self, device: Any = "meta") -> nn.Conv2d:
        """A plain ``nn.Conv2d`` of the shape this pair replaces (weights uninitialised on ``meta``)."""
        return dense_conv_like(self, device)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"multiplier={self.multiplier}"
        )


def check_separable_target(conv: nn.Module, name: str = "layer", multiplier: int = 1) -> None:
    """Raise when ``conv`` cannot be replaced: not a Conv2d, grouped / already depthwise, a 1 x 1 kernel, or
    a multiplier at or above ``min(N, k^2)`` (the per-channel rank bound: the pair would be exact and
    larger)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            f"{name} is a {type(conv).__name__}; depthwise-separable replacement takes an nn.Conv2d"
        )
    if conv.groups != 1:
        what = "already depthwise" if conv.groups == conv.in_channels else f"grouped (groups={conv.groups})"
        raise ValueError(f"{name} is {what}; only standard convolutions (groups=1) are replaced: exclude it")
    kh, kw = conv.kernel_size
    if kh * kw == 1:
        raise ValueError(
            f"{name} has a 1 x 1 kernel: it is already a pointwise convolution, a depthwise stage would only "
            "add a per-channel scale; exclude it"
        )
    bound = min(conv.out_channels, kh * kw)
    if multiplier >= bound:
        raise ValueError(
            f"multiplier {multiplier} for {name} must be below min(out_channels, k_h k_w) = {bound}: at "
            f"{bound} the pair reproduces the layer exactly with more weights than the layer itself"
        )


def depthwise_ratio(conv: nn.Conv2d, multiplier: int = 1) -> float:
    """Weight ratio replacement / original, ``m / N + m / (k_h k_w)`` (biases not counted)."""
    kh, kw = conv.kernel_size
    return multiplier / conv.out_channels + multiplier / (kh * kw)


def _like(conv: nn.Conv2d, multiplier: int) -> DepthwiseSeparableConv2d:
    w = conv.weight
    return DepthwiseSeparableConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        multiplier,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.bias is not None,
        conv.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )


def _factors_from_kernel(weight: Tensor, multiplier: int) -> tuple[Tensor, Tensor]:
    """Pointwise ``P`` [N, C m] and depthwise ``D`` [C m, k^2] from the per-input-channel SVD, float64."""
    n, c, kh, kw = weight.shape
    slices = weight.detach().to("cpu", torch.float64).permute(1, 0, 2, 3).reshape(c, n, kh * kw)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # [C, N, r], [C, r], [C, r, k^2]
    root = s[:, :multiplier].sqrt()
    p = (u[:, :, :multiplier] * root[:, None, :]).permute(1, 0, 2).reshape(n, c * multiplier)
    d = (root[:, :, None] * vh[:, :multiplier]).reshape(c * multiplier, kh * kw)
    return p, d


def _write(
    conv: nn.Conv2d, pointwise: Tensor, depthwise: Tensor, bias: Tensor | None, multiplier: int
) -> DepthwiseSeparableConv2d:
    new = _like(conv, multiplier)
    w = conv.weight
    kh, kw = conv.kernel_size
    with torch.no_grad():
        new[0].weight.copy_(depthwise.reshape(-1, 1, kh, kw).to(w.device, w.dtype))
        new[1].weight.copy_(pointwise.reshape(conv.out_channels, -1, 1, 1).to(w.device, w.dtype))
        if new[1].bias is not None:
            new[1].bias.copy_(bias.to(w.device, w.dtype))
    for p in new.parameters():
        p.requires_grad_(w.requires_grad)
    return new.train(conv.training)


def depthwise_from_kernel(
    conv: nn.Conv2d, multiplier: int = 1, name: str = "layer"
) -> DepthwiseSeparableConv2d:
    """Replacement initialised by the truncated SVD of each input channel's ``N x k^2`` kernel slice."""
    check_separable_target(conv, name, multiplier)
    p, d = _factors_from_kernel(conv.weight, multiplier)
    bias = None if conv.bias is None else conv.bias.detach()
    return _write(conv, p, d, bias, multiplier)


# -- activations -------------------------------------------------------------------------------------------


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) equivalent to the conv's own padding."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):  # 'same', as torch pads it
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def input_patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``[B L, C k_h k_w]``: the input values each of the ``L`` output positions of ``conv`` reads, ordered
    like ``conv.weight.flatten(1)`` (so ``patches @ W.flatten(1).T + b`` is the conv's output)."""
    pads = _explicit_padding(conv)
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # [B, C k^2, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class PatchMoment:
    """Running second moment ``E[phi~ phi~^T]`` of the input patches of ``conv`` (see :func:`patch_moment`).

    ``add(x)`` takes a batch of the conv's inputs ``[B, C, H, W]`` (e.g. from a forward pre-hook); only the
    ``(C k^2 + 1)``-square float64 sum is kept, never the activations. Batches are processed in chunks of at
    most ``max_elements`` patch values.
    """

    def __init__(self, conv: nn.Conv2d, max_elements: int = 1 << 22) -> None:
        self.conv = conv
        size = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
        self.total = torch.zeros(size, size, dtype=torch.float64)
        self.count = 0
        self.max_elements = max_elements

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        conv = self.conv
        if x.dim() != 4 or x.shape[1] != conv.in_channels:
            raise ValueError(
                f"expected conv inputs of shape [B, {conv.in_channels}, H, W], got {tuple(x.shape)}"
            )
        per_image = max(1, input_patches(conv, x[:1]).numel())
        for chunk in x.detach().split(max(1, self.max_elements // per_image)):
            patches = input_patches(conv, chunk).to("cpu", torch.float64)
            patches = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
            self.total += patches.T @ patches
            self.count += len(patches)

    def value(self, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The mean over every patch seen; ``reduce`` (e.g. a DDP all-reduce mean) is applied to it."""
        if self.count == 0:
            raise ValueError("patch_moment: no input batches were given")
        moment = self.total / self.count
        return moment if reduce is None else reduce(moment)


def patch_moment(
    conv: nn.Conv2d,
    inputs: Iterable[Tensor],
    reduce: Callable[[Tensor], Tensor] | None = None,
    max_elements: int = 1 << 22,
) -> Tensor:
    """Second moment ``E[phi~ phi~^T]`` (float64, ``(C k^2 + 1)`` square; the last row/column holds the mean
    patch and 1) of the input patches of ``conv`` over ``inputs`` (batches of the conv's input).

    ``reduce`` (e.g. an all-reduce mean across DDP ranks) is applied to the per-rank moment, so every rank
    fits the same replacement.
    """
    accumulator = PatchMoment(conv, max_elements)
    for x in inputs:
        accumulator.add(x)
    return accumulator.value(reduce)


def _augmented(conv: nn.Conv2d) -> Tensor:
    """``[W.flatten(1), b]`` (``b`` = 0 without bias), float64 on the CPU."""
    w = conv.weight.detach().to("cpu", torch.float64).flatten(1)
    b = torch.zeros(len(w), 1, dtype=torch.float64) if conv.bias is None else conv.bias.detach()
    return torch.cat([w, b.to("cpu", torch.float64).reshape(-1, 1)], 1)


def _block(d: Tensor, channels: int, multiplier: int) -> Tensor:
    """``D`` [C m, k^2] as the block-diagonal [C m, C k^2] map from patch to depthwise output."""
    k2 = d.shape[1]
    out = torch.zeros(channels * multiplier, channels * k2, dtype=d.dtype)
    for c in range(channels):
        out[c * multiplier : (c + 1) * multiplier, c * k2 : (c + 1) * k2] = d[
            c * multiplier : (c + 1) * multiplier
        ]
    return out


def _error(target: Tensor, approx: Tensor, moment: Tensor) -> float:
    delta = target - approx
    denominator = float(torch.einsum("ij,jk,ik->", target, moment, target))
    return float(torch.einsum("ij,jk,ik->", delta, moment, delta)) / max(denominator, 1e-300)


def _approx(p: Tensor, d: Tensor, b: Tensor, channels: int, multiplier: int) -> Tensor:
    return torch.cat([p @ _block(d, channels, multiplier), b.reshape(-1, 1)], 1)


def output_error(conv: nn.Conv2d, replacement: nn.Module, moment: Tensor) -> float:
    """Relative output error ``E||y - y_hat||^2 / E||y||^2`` of ``replacement`` (a
    :class:`DepthwiseSeparableConv2d` or any ``nn.Conv2d`` of the same shape) on the patches of ``moment``."""
    if isinstance(replacement, DepthwiseSeparableConv2d):
        c, m = replacement.in_channels, replacement.multiplier
        d = replacement[0].weight.detach().to("cpu", torch.float64).flatten(1)
        p = replacement[1].weight.detach().to("cpu", torch.float64).flatten(1)
        bias = replacement[1].bias
        b = (
            torch.zeros(len(p), dtype=torch.float64)
            if bias is None
            else bias.detach().to("cpu", torch.float64)
        )
        approx = _approx(p, d, b, c, m)
    else:
        approx = _augmented(replacement)
    return _error(_augmented(conv), approx, moment)


def _ridge(matrix: Tensor) -> Tensor:
    """A tiny diagonal load (1e-10 of the mean diagonal): rank-deficient data (dead channels) is solvable."""
    scale = float(matrix.diagonal().mean()) if matrix.numel() else 0.0
    return torch.eye(len(matrix), dtype=matrix.dtype) * (1e-10 * scale + 1e-300)


def fit_depthwise(
    conv: nn.Conv2d,
    moment: Tensor,
    multiplier: int = 1,
    iterations: int = 10,
    name: str = "layer",
) -> tuple[DepthwiseSeparableConv2d, list[float]]:
    """Replacement fitted to the layer's outputs on the data summarised by ``moment`` (:func:`patch_moment`).

    Starts from :func:`depthwise_from_kernel` and runs ``iterations`` rounds of alternating least squares
    (see the module docstring). Returns the replacement with the lowest error and the relative output errors
    ``[kernel SVD, after round 1, ...]`` (non-increasing up to round-off).
    """
    check_separable_target(conv, name, multiplier)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    c = conv.in_channels
    k2 = conv.kernel_size[0] * conv.kernel_size[1]
    dim = c * k2
    if tuple(moment.shape) != (dim + 1, dim + 1):
        raise ValueError(
            f"moment for {name} must be ({dim + 1}, {dim + 1}) (C k^2 + 1 square, from patch_moment), got "
            f"{tuple(moment.shape)}"
        )
    moment = moment.to("cpu", torch.float64)
    target = _augmented(conv)
    has_bias = conv.bias is not None
    p, d = _factors_from_kernel(conv.weight, multiplier)
    b = target[:, -1].clone()
    errors = [_error(target, _approx(p, d, b, c, multiplier), moment)]
    best = (errors[0], p, d, b)
    mxx = moment[:dim, :dim].reshape(c, k2, c, k2)
    for _ in range(iterations):
        # Pointwise weights (and bias) given the depthwise filters: Q (A M A^T) = W~ M A^T.
        a = torch.zeros(c * multiplier + has_bias, dim + 1, dtype=torch.float64)
        a[: c * multiplier, :dim] = _block(d, c, multiplier)
        if has_bias:
            a[-1, -1] = 1.0
        gram = a @ moment @ a.T
        q = torch.linalg.solve(gram + _ridge(gram), (target @ moment @ a.T).T).T
        p = q[:, : c * multiplier]
        if has_bias:
            b = q[:, -1]
        # Depthwise filters given the pointwise weights: G vec(D) = h.
        rest = target.clone()
        rest[:, -1] -= b
        rhs_full = (p.T @ (rest @ moment)[:, :dim]).reshape(c, multiplier, c, k2)
        h = torch.diagonal(rhs_full, dim1=0, dim2=2).permute(2, 0, 1).reshape(-1)  # [c, j, t]
        ptp = (p.T @ p).reshape(c, multiplier, c, multiplier)
        g = torch.einsum("ajbk,atbs->ajtbks", ptp, mxx).reshape(c * multiplier * k2, -1)
        d = torch.linalg.solve(g + _ridge(g), h).reshape(c * multiplier, k2)
        # Balance the scale between each filter and its pointwise column (the product is unchanged).
        scale = (p.norm(dim=0) / d.norm(dim=1).clamp_min(1e-300)).clamp_min(1e-300).sqrt()
        d, p = d * scale[:, None], p / scale[None, :]
        errors.append(_error(target, _approx(p, d, b, c, multiplier), moment))
        if errors[-1] < best[0]:
            best = (errors[-1], p, d, b)
    _, p, d, b = best
    return _write(conv, p, d, b if has_bias else None, multiplier), errors
