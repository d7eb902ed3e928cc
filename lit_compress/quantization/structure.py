"""The ``quantized`` structure kind: zoo entries whose layers quantize their inputs at inference.

Binary / k-bit activations (BNN, XNOR-Net, DoReFa) are part of the model's function, not of its weights, so
a zoo entry records them as plain data on its card: ``{"kind": "quantized", "version": 1, "modules": {fqn:
{"weight": quantizer spec, "input": quantizer spec}}, "inner": <another structure spec or null>}``. The
loader rebuilds the architecture, applies ``inner`` (e.g. removed channels), then swaps the listed layers
for :class:`~lit_compress.quantization.modules.QuantLinear` / ``QuantConv2d`` before loading the weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure, register_structure

KIND = "quantized"
VERSION = 1


def quantized_structure(modules: dict[str, Any], inner: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": KIND, "version": VERSION, "modules": modules, "inner": inner}


@register_structure(KIND)
def build_quantized(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    from lit_compress.quantization.modules import apply_quantization_spec

    if spec.get("version") != VERSION or not isinstance(spec.get("modules"), dict):
        raise ZooFormatError(
            f"quantized structure spec must be version {VERSION} with a 'modules' mapping, got "
            f"version {spec.get('version')!r}"
        )
    model = apply_structure(model, spec.get("inner"))
    try:
        return apply_quantization_spec(model, spec["modules"])
    except (ValueError, TypeError) as err:
        raise ZooFormatError(f"quantized structure spec does not fit the architecture: {err}") from err
