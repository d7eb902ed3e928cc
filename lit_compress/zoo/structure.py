"""Structure specs: plain data that reshapes a freshly built architecture before weights are loaded.

Physically pruned networks are smaller than the architecture their card names. The card's
``structure`` field is a JSON object ``{"kind": <name>, ...}``; a builder registered for that kind
rewrites the model (e.g. re-creating layers with the kept channel counts). No pickled modules, ever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lit_compress.zoo.errors import ZooFormatError

StructureBuilder = Callable[[nn.Module, dict[str, Any]], nn.Module]
_BUILDERS: dict[str, StructureBuilder] = {}


def register_structure(kind: str) -> Callable[[StructureBuilder], StructureBuilder]:
    def decorator(fn: StructureBuilder) -> StructureBuilder:
        _BUILDERS[kind] = fn
        return fn

    return decorator


def apply_structure(model: nn.Module, spec: dict[str, Any] | None) -> nn.Module:
    """Return ``model`` reshaped by ``spec`` (unchanged when ``spec`` is None)."""
    if spec is None:
        return model
    # Register the builders of every kind; imported here (not at module level) to avoid import cycles.
    import lit_compress.factorization.spec
    import lit_compress.gating.fbs_structure
    import lit_compress.gating.structure
    import lit_compress.pruning.depth_spec
    import lit_compress.pruning.structured.spec
    import lit_compress.quantization.int8
    import lit_compress.quantization.structure  # noqa: F401

    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _BUILDERS:
        raise ZooFormatError(
            f"structure kind {kind!r} is not known to this lit_compress (known: {sorted(_BUILDERS)}); "
            "upgrade lit_compress to load this entry."
        )
    return _BUILDERS[kind](model, spec)
