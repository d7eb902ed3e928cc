"""Dynamic gating: per-input computation skipping that really skips work at inference.

- :mod:`~lit_compress.gating.blockdrop`: BlockDrop mechanism (block discovery and shortcuts, gated blocks,
  policy network, reward, REINFORCE, grouped skipping, MAC statistics, the exportable ``BlockDropNetwork``).
- :mod:`~lit_compress.gating.blockdrop_callback`: the ``BlockDrop`` Lightning callback (imports Lightning, so
  it loads on first use: ``from lit_compress.gating import BlockDrop``).
- :mod:`~lit_compress.gating.structure`: the zoo's ``blockdrop`` structure kind.
- :mod:`~lit_compress.gating.fbs`: Feature Boosting and Suppression (saliency predictors, winner-take-all
  channel gates, eval that computes only the kept channels, per-image MAC statistics);
  :mod:`~lit_compress.gating.fbs_callback`: the ``FBS`` callback; :mod:`~lit_compress.gating.fbs_structure`:
  the zoo's ``fbs`` structure kind.
- :mod:`~lit_compress.gating.statistics`: per-image MAC / decision statistics of any gated net (zoo cards).
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
from lit_compress.gating.fbs import (
    FBSBatchNorm2d,
    FBSConv2d,
    FBSLinear,
    LayerPlan,
    MacStatistics,
    apply_fbs,
    fbs_layers,
    layer_plans,
    mac_statistics,
    macs_per_image,
    plan_fbs,
    plan_tails,
    set_density,
    winner_take_all,
)
from lit_compress.gating.fbs_structure import fbs_structure
from lit_compress.gating.statistics import dynamic_statistics, is_dynamic

# Callbacks import Lightning: name -> module, loaded on first access.
_CALLBACKS = {
    "BlockDrop": "lit_compress.gating.blockdrop_callback",
    "FBS": "lit_compress.gating.fbs_callback",
}

__all__ = [
    "FBS",
    "BlockCosts",
    "BlockDrop",
    "BlockDropNetwork",
    "FBSBatchNorm2d",
    "FBSConv2d",
    "FBSLinear",
    "GateState",
    "LayerPlan",
    "MacStatistics",
    "PolicyNet",
    "apply_fbs",
    "block_costs",
    "block_shortcut",
    "blockdrop_reward",
    "bound_probs",
    "dynamic_statistics",
    "fbs_layers",
    "fbs_structure",
    "find_blocks",
    "gate_blocks",
    "gating_statistics",
    "is_dynamic",
    "layer_plans",
    "learned_blocks",
    "mac_statistics",
    "macs_per_image",
    "plan_fbs",
    "plan_tails",
    "register_shortcut",
    "reinforce_loss",
    "set_density",
    "summarize_decisions",
    "ungate_blocks",
    "winner_take_all",
]


def __getattr__(name: str):
    if name in _CALLBACKS:
        return getattr(importlib.import_module(_CALLBACKS[name]), name)
    raise AttributeError(f"module 'lit_compress.gating' has no attribute {name!r}")
