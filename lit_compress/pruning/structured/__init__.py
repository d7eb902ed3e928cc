"""Structured pruning: channel groups, physical channel removal and the zoo structure spec.

channel_groups(model, example_input) finds which output channels must be removed together (residual
adds tie them) and who reads them; remove_channels() slices them out in place; rebuild_optimizer()
carries optimizer state over; structure_spec() records the new shapes as plain JSON for the zoo.
"""

from lit_compress.pruning.structured.criteria import (
    ChannelCriterion,
    ChannelScoringContext,
    get_channel_criterion,
    list_channel_criteria,
    register_channel_criterion,
)
from lit_compress.pruning.structured.graph import (
    ChannelGroup,
    ChannelRef,
    UnsupportedGraphError,
    channel_groups,
    register_channel_op,
)
from lit_compress.pruning.structured.penalties import Penalty, get_penalty, list_penalties, register_penalty
from lit_compress.pruning.structured.removal import (
    SliceInfo,
    rebuild_optimizer,
    remove_channels,
    slice_tensor,
    zero_channels,
)
from lit_compress.pruning.structured.spec import STRUCTURE_KIND, build_channels, structure_spec

__all__ = [
    "STRUCTURE_KIND",
    "ChannelCriterion",
    "ChannelGroup",
    "ChannelRef",
    "ChannelScoringContext",
    "Penalty",
    "SliceInfo",
    "StructuredPruning",
    "UnsupportedGraphError",
    "build_channels",
    "channel_groups",
    "get_channel_criterion",
    "get_penalty",
    "list_channel_criteria",
    "list_penalties",
    "rebuild_optimizer",
    "register_channel_criterion",
    "register_channel_op",
    "register_penalty",
    "remove_channels",
    "restore_structure",
    "slice_tensor",
    "structure_spec",
    "zero_channels",
]


def __getattr__(name: str):
    if name in ("StructuredPruning", "restore_structure"):  # the callback imports Lightning
        from lit_compress.pruning.structured import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'lit_compress.pruning.structured' has no attribute {name!r}")
