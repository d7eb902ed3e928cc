"""Quantized layers that subclass the layer they replace, so checkpoints and ``isinstance`` see no change.

:class:`QuantLinear` and :class:`QuantConv2d` hold the real-valued *latent* ``weight`` (and ``bias``) as
ordinary parameters under the same names, plus two plain attributes (not parameters, not in the
state_dict): ``weight_quantizer`` and ``input_quantizer``. Their forward is the parent's with
``weight -> weight_quantizer(weight)`` and ``input -> input_quantizer(input)``; the bias stays real (as in
BinaryConnect, BNN and XNOR-Net, where a batch norm usually follows anyway).

``from_float`` builds the quantized layer around the *same* ``Parameter`` objects (and the same hook
dictionaries) as the float layer, so an optimizer created before or after the swap, pruning masks keyed by
the parameter and hooks registered by other callbacks keep working. Supported: exactly ``nn.Linear`` and
``nn.Conv2d`` (any stride, padding, padding mode, dilation and groups). Anything else, subclasses with their
own forward included (e.g. timm's ``Conv2dSame``), is refused with a TypeError naming the type.

Zero padding of a quantized conv is applied *after* the input quantizer (as ``F.conv2d`` pads), so padded
positions contribute 0, not ``+-1``: the binary-kernel inference must reproduce that.

Model-level helpers: :func:`quantize_module`, :func:`replace_submodule`, :func:`quantization_spec` /
:func:`apply_quantization_spec` (JSON-able per-layer quantizer specs, e.g. for a zoo card) and
:func:`bake_quantized_weights` (the effective weights written into the ``weight`` parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_compress.quantization.quantizers import IdentityQuantizer, Quantizer, get_quantizer

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "apply_quantization_spec",
    "bake_quantized_weights",
    "is_quantized",
    "quantization_spec",
    "quantize_module",
    "replace_submodule",
]

_REGISTRY_DICTS = ("_parameters", "_buffers", "_modules")
_QUANTIZER_ATTRS = ("weight_quantizer", "input_quantizer")


class _QuantMixin:
    """Shared behaviour of the quantized layers (the quantizer attributes, swap and export helpers)."""

    _float_cls: type[nn.Module]
    weight: nn.Parameter
    training: bool
    weight_quantizer: Quantizer
    input_quantizer: Quantizer

    def _init_quantizers(self, weight_quantizer: Any, input_quantizer: Any) -> None:
        self.weight_quantizer = get_quantizer(weight_quantizer)
        self.input_quantizer = get_quantizer(input_quantizer)

    def quantized_weight(self, training: bool = False) -> Tensor:
        """The effective weight the forward uses (eval form by default: deterministic, for export)."""
        return self.weight_quantizer(self.weight, training)

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight_quantizer: Quantizer | str | Mapping[str, Any] | None = None,
        input_quantizer: Quantizer | str | Mapping[str, Any] | None = None,
    ) -> Any:
        """The quantized version of ``module``, sharing its Parameter objects, buffers and hooks."""
        if type(module) is not cls._float_cls:
            raise TypeError(
                f"{cls.__name__}.from_float expects exactly {cls._float_cls.__name__}, got "
                f"{type(module).__name__}; {_supported_hint()}"
            )
        new = cls.__new__(cls)
        _move_state(module, new)
        new._init_quantizers(weight_quantizer, input_quantizer)
        return new

    def to_float(self) -> nn.Module:
        """The plain float layer around the same latent parameters (undoes the swap; nothing is baked in)."""
        plain = self._float_cls.__new__(self._float_cls)
        _move_state(self, plain)
        for attr in _QUANTIZER_ATTRS:
            plain.__dict__.pop(attr, None)
        return plain

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, weight_quantizer={self.weight_quantizer.describe()}, " + (
            f"input_quantizer={self.input_quantizer.describe()}"
        )


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` computing ``F.linear(input_quantizer(x), weight_quantizer(weight), bias)``."""

    _float_cls = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        weight_quantizer: Quantizer | str | Mapping[str, Any] | None = None,
        input_quantizer: Quantizer | str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quantizers(weight_quantizer, input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_quantizer(self.weight, self.training)
        return F.linear(self.input_quantizer(x, self.training), w, self.bias)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` convolving ``input_quantizer(x)`` with ``weight_quantizer(weight)`` (real bias)."""

    _float_cls = nn.Conv2d

    def __init__(
        self,
        *args: Any,
        weight_quantizer: Quantizer | str | Mapping[str, Any] | None = None,
        input_quantizer: Quantizer | str | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_quantizer, input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_quantizer(self.weight, self.training)
        return self._conv_forward(self.input_quantizer(x, self.training), w, self.bias)


QUANT_MODULES: dict[type[nn.Module], type[_QuantMixin]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def is_quantized(module: nn.Module) -> bool:
    """True for :class:`QuantLinear` / :class:`QuantConv2d`."""
    return isinstance(module, _QuantMixin)


def quantize_module(
    module: nn.Module,
    weight_quantizer: Quantizer | str | Mapping[str, Any] | None = None,
    input_quantizer: Quantizer | str | Mapping[str, Any] | None = None,
) -> nn.Module:
    """``QuantLinear.from_float`` or ``QuantConv2d.from_float`` by the exact type of ``module``."""
    if is_quantized(module):
        raise TypeError(f"{type(module).__name__} is already quantized; call to_float() first to re-quantize")
    quant_cls = QUANT_MODULES.get(type(module))
    if quant_cls is None:
        raise TypeError(f"cannot quantize a {type(module).__name__}: {_supported_hint()}")
    return quant_cls.from_float(module, weight_quantizer, input_quantizer)  # type: ignore[return-value]


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at FQN ``name`` inside ``root`` (works for Sequential / ModuleList indices too)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantization_spec(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{fqn: {"weight": spec, "input": spec}}`` of every quantized layer (JSON-able quantizer specs)."""
    return {
        name: {"weight": m.weight_quantizer.to_spec(), "input": m.input_quantizer.to_spec()}
        for name, m in model.named_modules()
        if is_quantized(m)
    }


def apply_quantization_spec(model: nn.Module, spec: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Swap the layers named in ``spec`` (see :func:`quantization_spec`) in place; returns ``model``."""
    for name, layer in spec.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"quantization spec names layer {name!r}, which the model does not have"
            ) from err
        replace_submodule(model, name, quantize_module(module, layer.get("weight"), layer.get("input")))
    return model


@torch.no_grad()
def bake_quantized_weights(model: nn.Module, keep_input_quantizers: bool = True) -> nn.Module:
    """Write each quantized layer's effective (eval) weight into its ``weight`` parameter, in place.

    A layer whose input quantizer is ``identity`` becomes the plain float layer; one that quantizes its input
    stays quantized with an ``identity`` weight quantizer (so the model's output is unchanged), unless
    ``keep_input_quantizers=False``, which makes every layer plain (activations then stay real). Returns
    ``model`` (modified in place: pass a copy to keep the latent weights).
    """
    for name, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        module.weight.copy_(module.quantized_weight(training=False))
        module.weight_quantizer = IdentityQuantizer()
        if not keep_input_quantizers or isinstance(module.input_quantizer, IdentityQuantizer):
            plain = module.to_float()
            if name:
                replace_submodule(model, name, plain)
            else:
                model = plain
    return model


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the attributes of ``src``: the same Parameter / buffer / child objects and hook dicts."""
    dst.__dict__.update(src.__dict__)
    for attr in _REGISTRY_DICTS:  # own containers holding the same objects
        dst.__dict__[attr] = type(src.__dict__[attr])(src.__dict__[attr])
    dst.__dict__["_non_persistent_buffers_set"] = set(src.__dict__.get("_non_persistent_buffers_set", ()))


def _supported_hint() -> str:
    return (
        "supported layers are exactly nn.Linear and nn.Conv2d (QuantLinear / QuantConv2d); exclude this "
        "layer (exclude: ['<its name>']) or restrict types (types: ['Conv2d', 'Linear'])"
    )
