"""Per-image statistics of a dynamic (input-dependent) network over a dataset: one entry point for the zoo.

A gated network spends a different number of MACs on each image, so a zoo card's effective MACs are the
mean over the real test set (plus std, min, max and the method's own statistics: blocks used, distinct
policies, ...), not the count of one example input. :func:`dynamic_statistics` recognises the dynamic
networks this package builds (BlockDrop's :class:`~lit_compress.gating.blockdrop.BlockDropNetwork`, networks
with FBS layers) and returns ``None`` for a static network. Every result has ``macs_mean`` and ``macs_std``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["dynamic_statistics", "is_dynamic"]


def is_dynamic(model: nn.Module) -> bool:
    """True for a network whose per-image work depends on its input (BlockDrop or FBS)."""
    from lit_compress.gating.blockdrop import BlockDropNetwork
    from lit_compress.gating.fbs import fbs_layers

    return isinstance(model, BlockDropNetwork) or bool(fbs_layers(model))


def dynamic_statistics(model: nn.Module, batches: Iterable[Any]) -> dict[str, Any] | None:
    """Decision and per-image MAC statistics of ``model`` over ``batches`` (eval mode); None if static."""
    from lit_compress.gating.blockdrop import BlockDropNetwork, gating_statistics
    from lit_compress.gating.fbs import fbs_layers, mac_statistics

    if isinstance(model, BlockDropNetwork):
        return gating_statistics(model, batches)
    if not fbs_layers(model):
        return None
    was_training = model.training
    model.eval()
    try:
        stats = mac_statistics(model, batches).to_dict()
    finally:
        model.train(was_training)
    return {
        "images": stats["images"],
        "macs_mean": round(stats["mean"], 1),
        "macs_std": round(stats["std"], 1),
        "macs_min": round(stats["min"], 1),
        "macs_max": round(stats["max"], 1),
        "macs_dense": stats["dense"],
        "mac_reduction": stats["reduction"],
    }
