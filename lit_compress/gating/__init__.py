"""Dynamic gating: per-input computation skipping that really skips work at inference.

- :mod:`~lit_compress.gating.blockdrop`: BlockDrop mechanism (block discovery and shortcuts, gated blocks,
  policy network, reward, REINFORCE, grouped skipping, MAC statistics, the exportable ``BlockDropNetwork``).
- :mod:`~lit_compress.gating.blockdrop_callback`: the ``BlockDrop`` Lightning callback (imports Lightning, so
  it loads on first use: ``from lit_compress.gating import BlockDrop``).
- :mod:`~lit_compress.gating.structure`: the zoo's ``blockdrop`` structure kind.
"""

import importlib

from lit_compress.gating.blockdrop import (
    BlockCosts,
    BlockDropNetwork,
    GateState,
    PolicyNet,
    block_costs,
    block_shortcut,
    blockdrop_reward,
    bound_probs,
    find_blocks,
    gate_blocks,
    gating_statistics,
    learned_blocks,
    register_shortcut,
    reinforce_loss,
    summarize_decisions,
    ungate_blocks,
)

# Callbacks import Lightning: name -> module, loaded on first access.
_CALLBACKS = {
    "BlockDrop": "lit_compress.gating.blockdrop_callback",
}

__all__ = [
    "BlockCosts",
    "BlockDrop",
    "BlockDropNetwork",
    "GateState",
    "PolicyNet",
    "block_costs",
    "block_shortcut",
    "blockdrop_reward",
    "bound_probs",
    "find_blocks",
    "gate_blocks",
    "gating_statistics",
    "learned_blocks",
    "register_shortcut",
    "reinforce_loss",
    "summarize_decisions",
    "ungate_blocks",
]


def __getattr__(name: str):
    if name in _CALLBACKS:
        return getattr(importlib.import_module(_CALLBACKS[name]), name)
    raise AttributeError(f"module 'lit_compress.gating' has no attribute {name!r}")
