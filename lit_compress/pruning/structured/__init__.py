"""Structured pruning: channel groups, physical channel removal and the zoo structure spec.

channel_groups(model, example_input) finds which output channels must be removed together (residual
adds tie them) and who reads them; remove_channels() slices them out in place; rebuild_optimizer()
carries optimizer state over; structure_spec() records the new shapes as plain JSON for the zoo.
"""

from lit_compress.pruning.structured.graph import (
    ChannelGroup,
    ChannelRef,
    UnsupportedGraphError,
    channel_groups,
    register_channel_op,
)
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
    "ChannelGroup",
    "ChannelRef",
    "SliceInfo",
    "UnsupportedGraphError",
    "build_channels",
    "channel_groups",
    "rebuild_optimizer",
    "register_channel_op",
    "remove_channels",
    "slice_tensor",
    "structure_spec",
    "zero_channels",
]
