"""Structure spec of a depth-pruned network: which residual blocks were replaced by their shortcut.

Plain JSON, never pickled modules::

    {"kind": "depth", "version": 1, "removed": ["layer1.0", "layer2.1"], "inner": null}

The builder registered for kind ``"depth"`` applies ``inner`` first (any other structure spec, e.g. the
``"channels"`` spec of a network that was also channel-pruned; null when none), then replaces every listed
block of the freshly built architecture by :func:`~lit_compress.pruning.depth.shortcut_replacement` (its
shortcut and post-addition activation), before the weights are loaded. Kept parameters keep their names, so
the exported state_dict loads as is.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from lit_compress.pruning.depth import ResidualShortcut, remove_blocks, residual_blocks
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure, register_structure

__all__ = ["STRUCTURE_KIND", "STRUCTURE_VERSION", "build_depth", "depth_spec"]

STRUCTURE_KIND = "depth"
STRUCTURE_VERSION = 1


def depth_spec(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """The spec turning ``reference`` (the freshly built architecture) into ``model``'s structure.

    ``removed`` lists the FQNs where ``model`` has a :class:`ResidualShortcut` and ``reference`` a residual
    block. If layer shapes differ beyond that (channels removed too), a ``"channels"`` spec is recorded as
    ``inner``. Raises ValueError when the difference cannot be expressed (another module type elsewhere).
    """
    blocks = residual_blocks(reference)
    removed = [name for name, m in model.named_modules() if isinstance(m, ResidualShortcut)]
    unknown = [name for name in removed if name not in blocks]
    if unknown:
        raise ValueError(
            f"model has removed blocks {unknown} where the reference architecture has no residual block "
            f"(its blocks: {list(blocks)}); depth_spec needs the architecture the network was built as"
        )
    rebuilt = copy.deepcopy(reference)
    remove_blocks(rebuilt, removed)
    inner = None
    if _shapes(rebuilt) != _shapes(model):
        from lit_compress.pruning.structured.spec import structure_spec

        inner = structure_spec(model, rebuilt)  # raises ValueError naming what it cannot express
    spec = {"kind": STRUCTURE_KIND, "version": STRUCTURE_VERSION, "removed": removed, "inner": inner}
    check = build_depth(copy.deepcopy(reference), spec)
    if _shapes(check) != _shapes(model):
        diff = sorted(set(_shapes(check).items()) ^ set(_shapes(model).items()))
        raise ValueError(
            f"depth_spec cannot express how the model differs from the reference architecture: {diff[:5]}"
        )
    return spec


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@register_structure(STRUCTURE_KIND)
def build_depth(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Replace each block listed in ``spec["removed"]`` of the freshly built ``model`` by its shortcut."""
    if not isinstance(spec, dict) or spec.get("kind") != STRUCTURE_KIND:
        raise ZooFormatError(f"expected a structure spec of kind {STRUCTURE_KIND!r}, got {spec!r:.200}")
    if spec.get("version") != STRUCTURE_VERSION:
        raise ZooFormatError(
            f"depth structure spec version {spec.get('version')!r} is not supported (this lit_compress reads "
            f"version {STRUCTURE_VERSION}); upgrade lit_compress"
        )
    extra = set(spec) - {"kind", "version", "removed", "inner"}
    if extra:
        raise ZooFormatError(
            f"depth structure spec has unknown keys {sorted(extra)} (allowed: kind, version, removed, inner)"
        )
    removed = spec.get("removed")
    if not isinstance(removed, list) or not all(isinstance(r, str) and r for r in removed):
        raise ZooFormatError(
            f"depth structure spec 'removed' must be a list of block names, got {removed!r:.200}"
        )
    if len(set(removed)) != len(removed):
        raise ZooFormatError(f"depth structure spec 'removed' lists a block twice: {removed}")
    inner = spec.get("inner")
    if inner is not None and not isinstance(inner, dict):
        raise ZooFormatError(
            f"depth structure spec 'inner' must be a structure spec or null, got {inner!r:.200}"
        )
    model = apply_structure(model, inner)
    try:
        remove_blocks(model, removed)
    except ValueError as err:
        raise ZooFormatError(
            f"depth structure spec does not fit {type(model).__name__}: {err}; the card's architecture and "
            "its structure spec do not match"
        ) from err
    return model
