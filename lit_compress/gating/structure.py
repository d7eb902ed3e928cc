"""The ``blockdrop`` structure kind: zoo entries whose network skips residual blocks per input.

A BlockDrop model is the card's architecture plus a policy network; which blocks are gated, how the policy is
built and which blocks an unfinished curriculum keeps on are part of the model's function, so the card
records them as plain data::

    {"kind": "blockdrop", "version": 1, "blocks": ["layer1.0", ...], "policy": {PolicyNet config},
     "always_on": [0, 1], "inner": <another structure spec or null>}

The loader builds the architecture, applies ``inner`` (e.g. removed channels), then wraps it into a
:class:`~lit_compress.gating.blockdrop.BlockDropNetwork` (gated blocks + a fresh policy) whose state_dict
(``backbone.*``, ``policy.*``) the entry's weights file holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure, register_structure

KIND = "blockdrop"
VERSION = 1


def blockdrop_structure(
    blocks: Sequence[str],
    policy: dict[str, Any],
    always_on: Sequence[int] = (),
    inner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card's structure spec of a BlockDrop network (see the module docstring)."""
    return {
        "kind": KIND,
        "version": VERSION,
        "blocks": list(blocks),
        "policy": dict(policy),
        "always_on": [int(i) for i in always_on],
        "inner": inner,
    }


@register_structure(KIND)
def build_blockdrop(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    from lit_compress.gating.blockdrop import BlockDropNetwork, PolicyNet, find_blocks

    if spec.get("version") != VERSION:
        raise ZooFormatError(
            f"blockdrop structure spec must be version {VERSION}, got {spec.get('version')!r}"
        )
    blocks, policy, always_on = spec.get("blocks"), spec.get("policy"), spec.get("always_on", [])
    if not (isinstance(blocks, list) and blocks and all(isinstance(b, str) for b in blocks)):
        raise ZooFormatError(
            f"blockdrop structure spec needs a non-empty 'blocks' list of FQNs, got {blocks!r}"
        )
    if not isinstance(policy, dict):
        raise ZooFormatError(f"blockdrop structure spec needs a 'policy' mapping, got {policy!r}")
    model = apply_structure(model, spec.get("inner"))
    try:
        find_blocks(model, include=blocks, types=None)  # every listed FQN must be a gateable block
        return BlockDropNetwork(model, PolicyNet(**policy), blocks, always_on)
    except (ValueError, TypeError) as err:
        raise ZooFormatError(f"blockdrop structure spec does not fit the architecture: {err}") from err
