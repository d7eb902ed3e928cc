"""Quantization-aware training: straight-through estimators, quantizers, quantized layers, callback.

from lit_compress.quantization import Quantization
Trainer(callbacks=[Quantization(method="binaryconnect")])          # or "bnn", "xnor", "dorefa" (bits=...)

- :mod:`~lit_compress.quantization.ste`: the autograd Functions (forward and gradient rule in each docstring).
- :mod:`~lit_compress.quantization.quantizers`: named, serialisable quantizers and their registry.
- :mod:`~lit_compress.quantization.modules`: ``QuantLinear`` / ``QuantConv2d`` (subclasses of the layers they
  replace, sharing their parameters) and model-level swap / spec / bake helpers.
- :mod:`~lit_compress.quantization.binary_inference`: ``to_binary_inference`` runs trained BNN / XNOR
  layers with xnor + popcount (:mod:`~lit_compress.quantization.binary_kernel`).
- :mod:`~lit_compress.quantization.callback`: the ``Quantization`` Lightning callback (imports Lightning,
  so it loads on first use).
"""

from lit_compress.quantization.binary_inference import (
    BinaryConv2d,
    binary_inference_plan,
    to_binary_inference,
)
from lit_compress.quantization.binary_kernel import BinaryLinear
from lit_compress.quantization.modules import (
    QuantConv2d,
    QuantLinear,
    apply_quantization_spec,
    bake_quantized_weights,
    is_quantized,
    quantization_spec,
    quantize_module,
    replace_submodule,
)
from lit_compress.quantization.quantizers import (
    BinaryQuantizer,
    DoReFaActivationQuantizer,
    DoReFaWeightQuantizer,
    IdentityQuantizer,
    Quantizer,
    SignQuantizer,
    XnorActivationQuantizer,
    XnorWeightQuantizer,
    get_quantizer,
    list_quantizers,
    register_quantizer,
)

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "BinaryQuantizer",
    "DoReFaActivationQuantizer",
    "DoReFaWeightQuantizer",
    "IdentityQuantizer",
    "Int8QAT",
    "QuantConv2d",
    "QuantLinear",
    "Quantization",
    "Quantizer",
    "SignQuantizer",
    "XnorActivationQuantizer",
    "XnorWeightQuantizer",
    "apply_quantization_spec",
    "bake_quantized_weights",
    "binary_inference_plan",
    "get_quantizer",
    "is_quantized",
    "list_quantizers",
    "quantization_spec",
    "quantize_module",
    "register_quantizer",
    "replace_submodule",
    "to_binary_inference",
]


def __getattr__(name: str):
    if name == "Quantization":  # the callbacks import Lightning
        from lit_compress.quantization.callback import Quantization

        return Quantization
    if name == "Int8QAT":
        from lit_compress.quantization.int8_callback import Int8QAT

        return Int8QAT
    raise AttributeError(f"module 'lit_compress.quantization' has no attribute {name!r}")
