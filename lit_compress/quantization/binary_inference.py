"""Run a trained binary network's binary layers with xnor + popcount instead of float matmuls.

A BNN / XNOR-Net layer (``QuantLinear`` / ``QuantConv2d`` with a sign input quantizer and binary weights,
``+-alpha_c`` per output channel) computes ``alpha_c * (sign(x) . sign(w_c)) + b_c``. The dot product of
two ``+-1`` vectors is ``n - 2 * popcount(xor)``, which :class:`~lit_compress.quantization.binary_kernel.
BinaryLinear` evaluates on 64 weights per machine word. :func:`to_binary_inference` swaps every layer that
qualifies; :class:`BinaryConv2d` runs a convolution as im2col (``F.unfold``) + that binary GEMM.

What qualifies (anything else is left as it is, and listed by :func:`binary_inference_plan`):

- the input quantizer outputs exactly ``+-1``: ``sign`` (without ``keep_zeros``) or ``xnor_activation``;
- the effective eval weight is binary per output channel (no pruned zeros: the kernel has no "0" weight);
- convolutions: ``groups == 1`` and no padding (a padded position contributes 0 to the float conv, but
  ``+-1`` to an xnor), any stride and dilation.

The result equals the fake-quantized float layer up to float summation order (the xnor path is exact in
integers, then scaled once).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_compress.quantization.binary_kernel import Backend, BinaryLinear
from lit_compress.quantization.modules import QuantConv2d, QuantLinear, is_quantized, replace_submodule
from lit_compress.quantization.quantizers import SignQuantizer, XnorActivationQuantizer

__all__ = ["BinaryConv2d", "binary_inference_plan", "to_binary_inference"]


class BinaryConv2d(nn.Module):
    """``alpha_c * conv(sign(x), sign(W_c)) + b_c`` as ``F.unfold`` + :class:`BinaryLinear` (no padding).

    Build it with :meth:`from_conv` from a conv whose weight is binary per output channel. Input
    ``[N, C, H, W]`` float on the CPU; output ``[N, out_channels, H_out, W_out]``.
    """

    def __init__(
        self,
        linear: BinaryLinear,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        super().__init__()
        self.linear = linear
        self.in_channels, self.out_channels = in_channels, linear.out_features
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, weight: Tensor | None = None, backend: Backend = "auto"
    ) -> BinaryConv2d:
        """Convert ``conv`` (``weight``: its effective binary weight, default ``conv.weight``)."""
        problem = _conv_problem(conv)
        if problem:
            raise ValueError(f"BinaryConv2d.from_conv: {problem}")
        w = (conv.weight if weight is None else weight).detach()
        flat = nn.Linear(w[0].numel(), conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            flat.weight.copy_(w.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                flat.bias.copy_(conv.bias.detach())
        linear = BinaryLinear.from_linear(flat, backend=backend)
        return cls(
            linear, conv.in_channels, _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [N, {self.in_channels}, H, W], got {list(x.shape)}")
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        h_out = (h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # [N, C*kh*kw, L]
        out = self.linear(cols.transpose(1, 2))  # [N, L, out]
        return out.transpose(1, 2).reshape(n, self.out_channels, h_out, w_out)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, backend={self.linear.backend!r}"
        )


def binary_inference_plan(model: nn.Module) -> dict[str, str]:
    """``{fqn: "binary" or the reason it stays a float layer}`` for every quantized layer of ``model``."""
    plan = {}
    for name, module in model.named_modules():
        if is_quantized(module):
            plan[name] = _problem(module) or "binary"
    return plan


@torch.no_grad()
def to_binary_inference(model: nn.Module, backend: Backend = "auto", strict: bool = False) -> nn.Module:
    """Swap every qualifying quantized layer for :class:`BinaryLinear` / :class:`BinaryConv2d`, in place.

    Returns ``model`` (pass a copy to keep the trainable one). ``strict=True`` raises ValueError naming each
    quantized layer that binarises its input but cannot run binary (and why) instead of leaving it in float.
    Inference only: the new layers have no gradient and no float weight.
    """
    plan = binary_inference_plan(model)
    if strict:
        bad = {n: why for n, why in plan.items() if why != "binary" and not why.startswith("input is not")}
        if bad:
            raise ValueError(f"to_binary_inference(strict=True): these layers cannot run binary: {bad}")
    for name, why in plan.items():
        if why != "binary":
            continue
        module = model.get_submodule(name)
        weight = module.quantized_weight(training=False)
        if isinstance(module, QuantLinear):
            flat = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            flat.weight.copy_(weight)
            if module.bias is not None:
                flat.bias.copy_(module.bias)
            new: nn.Module = BinaryLinear.from_linear(flat, backend=backend)
        else:
            new = BinaryConv2d.from_conv(module, weight, backend=backend)
        if name:
            replace_submodule(model, name, new)
        else:
            model = new
    return model


def _problem(module: Any) -> str | None:
    quantizer = module.input_quantizer
    pm1 = isinstance(quantizer, XnorActivationQuantizer) or (
        isinstance(quantizer, SignQuantizer) and not quantizer.keep_zeros
    )
    if not pm1:
        return f"input is not binarised to +-1 (input quantizer {quantizer.describe()})"
    if isinstance(module, QuantConv2d):
        problem = _conv_problem(module)
        if problem:
            return problem
    elif not isinstance(module, QuantLinear):
        return f"{type(module).__name__} has no binary kernel"
    weight = module.quantized_weight(training=False)
    rows = weight.detach().reshape(weight.shape[0], -1).abs()
    if not torch.isfinite(rows).all() or not (rows == rows[:, :1]).all():
        return "weight is not +-alpha per output channel (pruned zeros or several magnitudes)"
    return None


def _conv_problem(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}) has no binary kernel"
    padding = conv.padding
    padded = padding != "valid" if isinstance(padding, str) else any(p != 0 for p in _pair(padding))
    if padded:
        return f"padding {conv.padding!r}: padded zeros would count as +-1 in xnor arithmetic"
    return None


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
