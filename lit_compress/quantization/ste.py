"""Straight-through estimators: each a tiny ``torch.autograd.Function`` with its forward and gradient rule.

``sign`` and ``round`` have a zero derivative almost everywhere, so quantization-aware training replaces
their backward pass by a surrogate (the straight-through estimator, STE). Every Function below states its
forward and its gradient rule in its docstring; ``tests/unit/test_quantization_ste.py`` checks each against
the explicit formula (``torch.autograd.gradcheck`` does not apply: the forward is piecewise constant).

The compositions used by the quantizers (DoReFa weights/activations, XNOR weights) are plain functions at
the end of this module, built from these Functions and ordinary differentiable torch ops.

Conventions:

- ``sign(0) = +1`` everywhere (binary outputs are always exactly ``+1`` or ``-1``; ``sign(-0.0) = +1``,
  ``sign(NaN) = -1``), as in BinaryConnect ("``+1`` if ``w >= 0``") and BNN. Keeping pruned zeros at
  zero is the quantizers' job (``keep_zeros``).
- ``round`` is ``torch.round``: half to even.
- Outputs have the input's dtype and device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BinaryConnectDeterministic",
    "BinaryConnectStochastic",
    "RoundSTE",
    "SignSTE",
    "XnorWeightSTE",
    "dorefa_activation",
    "dorefa_quantize",
    "dorefa_weight",
    "hard_sigmoid",
    "sign_pm1",
    "unit_interval_mask",
]


def sign_pm1(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0`` (``-0.0`` included), ``-1`` elsewhere (NaN included), no autograd.

    The same convention as the bit packing and the xnor/popcount kernel (bit 1 = ``+1``).
    """
    if not x.is_floating_point():
        return torch.where(x >= 0, 1, -1).to(x.dtype)
    # sign(x) + 0.5 is -0.5 / 0.5 / 1.5 for x < 0 / x == 0 / x > 0, so its sign is the +-1 we want. Built
    # from vectorised float kernels: a bool mask + torch.where is several times slower on CPU.
    # (torch.sign's vectorised CPU kernel maps NaN to 0, hence the nan_to_num first.)
    return torch.nan_to_num(x, nan=-1.0).sign_().add_(0.5).sign_()


def unit_interval_mask(x: Tensor) -> Tensor:
    """``1.0`` where ``|x| <= 1``, ``0.0`` elsewhere (NaN included), in ``x``'s dtype: the hard-tanh STE.

    ``sign(1 - |x|) + 1`` is 0 / 1 / 2 below / at / above the boundary; clamped to 1 it is the inclusive
    mask, computed with float kernels only (comparison ops that produce bool tensors are slow on CPU).
    """
    return x.abs().nan_to_num_(nan=2.0).neg_().add_(1.0).sign_().add_(1.0).clamp_(max=1.0)


def hard_sigmoid(x: Tensor) -> Tensor:
    """``clip((x + 1) / 2, 0, 1)``: BinaryConnect's probability of binarising to ``+1``."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


class SignSTE(torch.autograd.Function):
    """BNN sign with the "hard tanh" straight-through estimator (Hubara et al. 2016).

    forward:  ``y = +1 if x >= 0 else -1``
    backward: ``dL/dx = dL/dy * 1{|x| <= 1}`` (the derivative of ``hardtanh``: the gradient is cancelled
    where ``|x| > 1``, which stops saturated latent values from growing without bound).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return sign_pm1(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * unit_interval_mask(x).to(grad.dtype)


class BinaryConnectDeterministic(torch.autograd.Function):
    """BinaryConnect's deterministic binarisation (Courbariaux et al. 2015).

    forward:  ``w_b = +1 if w >= 0 else -1``
    backward: ``dL/dw = dL/dw_b`` (identity: the gradient with respect to the binary weight is applied to
    the real-valued latent weight; the latent weight is kept in ``[-1, 1]`` by clipping after each step).
    """

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        return sign_pm1(w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class BinaryConnectStochastic(torch.autograd.Function):
    """BinaryConnect's stochastic binarisation (Courbariaux et al. 2015).

    forward:  ``w_b = +1`` with probability ``p = hard_sigmoid(w) = clip((w + 1) / 2, 0, 1)``, else ``-1``;
    the uniform draws come from the ``generator`` argument (callers own it, so runs are reproducible and a
    checkpoint can store its state). When the generator lives on another device than ``w`` the draws are
    made there and copied, so a CPU generator gives the same binary weights on any device.
    backward: ``dL/dw = dL/dw_b`` (identity), no gradient for the generator.
    """

    @staticmethod
    def forward(ctx, w: Tensor, generator: torch.Generator | None) -> Tensor:
        device = w.device if generator is None else generator.device
        u = torch.rand(w.shape, generator=generator, device=device, dtype=torch.float32).to(w.device)
        p = hard_sigmoid(w.detach().float())
        # +1 where u < p: sign(p - u) - 0.5 is 0.5 there and -0.5 / -1.5 elsewhere (float kernels only).
        return (p - u).sign_().sub_(0.5).sign_().to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class RoundSTE(torch.autograd.Function):
    """Rounding with the identity straight-through estimator (used by DoReFa's ``quantize_k``).

    forward:  ``y = round(x)`` (``torch.round``, half to even)
    backward: ``dL/dx = dL/dy``
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class XnorWeightSTE(torch.autograd.Function):
    """XNOR-Net weight binarisation with a per-output-channel scale (Rastegari et al. 2016).

    forward:  ``W_q = alpha_c * sign(W)`` for output channel ``c`` (dim 0), ``alpha_c = mean |W_c|`` over the
    channel's other dims, ``sign(0) = +1``. With ``keep_zeros=True`` weights that are exactly zero (pruned)
    stay exactly zero and ``alpha_c`` is the mean ``|W|`` over the channel's *nonzero* weights (the
    least-squares scale for the ternary pattern; identical to the plain mean when nothing is pruned).
    backward: the paper's rule ``dL/dW = dL/dW_q * (1/n + alpha_c * 1{|W| <= 1})`` with ``n`` the number of
    (nonzero, with ``keep_zeros``) weights per channel, zero for kept zeros. The paper keeps only the
    diagonal of the Jacobian of ``alpha_c * sign(W)``: the cross terms ``sign(W_i) sign(W_j) / n`` of the
    exact derivative of ``alpha_c`` are dropped, as in the reference implementation.
    """

    @staticmethod
    def forward(ctx, w: Tensor, keep_zeros: bool) -> Tensor:
        if w.dim() < 2:
            raise ValueError(
                f"XNOR weight binarisation needs a weight with an output-channel dim and at least one more "
                f"dim, got shape {tuple(w.shape)}"
            )
        dims = tuple(range(1, w.dim()))
        kept = (w != 0) if keep_zeros else torch.ones_like(w, dtype=torch.bool)
        n = kept.sum(dim=dims, keepdim=True).clamp_min(1).to(w.dtype)
        alpha = w.abs().sum(dim=dims, keepdim=True) / n
        out = sign_pm1(w) * alpha
        if keep_zeros:
            out = out * kept
        ctx.save_for_backward(w, alpha, n, kept)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        w, alpha, n, kept = ctx.saved_tensors
        local = 1.0 / n + alpha * unit_interval_mask(w).to(grad.dtype)
        return grad * local * kept.to(grad.dtype), None


# -- compositions -------------------------------------------------------------------------------------


def dorefa_quantize(x: Tensor, bits: int) -> Tensor:
    """DoReFa's ``quantize_k(x) = round((2^k - 1) x) / (2^k - 1)``, ``x`` in ``[0, 1]``; identity gradient."""
    n = float(2**bits - 1)
    return RoundSTE.apply(x * n) / n


def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa k-bit weights (Zhou et al. 2016), ``bits`` in 2..32.

    ``w_q = 2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 0.5) - 1``, the max taken over the whole tensor.
    The gradient flows through ``tanh`` and the normalisation (including the max, as in the reference
    TensorFlow code); ``round`` is straight-through. Values lie on the grid ``{2i / (2^k - 1) - 1}``.
    """
    t = torch.tanh(w)
    x = t / (2.0 * t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)) + 0.5
    return 2.0 * dorefa_quantize(x, bits) - 1.0


def dorefa_activation(a: Tensor, bits: int) -> Tensor:
    """DoReFa k-bit activations ``a_q = quantize_k(clip(a, 0, 1))``; gradient ``1{0 <= a <= 1}``.

    The clip is written with ``torch.where`` so that the gradient at the boundaries (``a = 0``, ``a = 1``)
    is 1 whatever ``torch.clamp``'s backward convention of the installed torch version.
    """
    inside = (a >= 0) & (a <= 1)
    return dorefa_quantize(torch.where(inside, a, a.detach().clamp(0.0, 1.0)), bits)
